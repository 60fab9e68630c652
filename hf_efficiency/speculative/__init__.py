"""Speculative decoding: a draft proposes tokens, the target verifies them in one forward pass.

Reached through ``model.generate(..., draft_model=..., speculative=SpeculativeConfig(...))`` (see
`generate.py`), or directly with `speculative_generate`. Drafts (`drafts.py`): a separate model,
a quantized or half-precision copy of the target, an early-exit view of the target, n-gram lookup.
"""

from .drafts import (
    Drafter,
    ModelDrafter,
    NgramDrafter,
    Proposal,
    build_drafter,
    check_draft_vocabulary,
    early_exit_model,
    half_copy,
    quantized_copy,
)
from .generate import SpeculativeDecoderOnlyOutput
from .loop import DraftLength, SpeculativeStats, expected_tokens_per_pass, speculative_generate
from .slots import left_pad
from .verify import greedy_verify, sampling_verify

__all__ = [
    "DraftLength",
    "Drafter",
    "ModelDrafter",
    "NgramDrafter",
    "Proposal",
    "SpeculativeDecoderOnlyOutput",
    "SpeculativeStats",
    "build_drafter",
    "check_draft_vocabulary",
    "early_exit_model",
    "expected_tokens_per_pass",
    "greedy_verify",
    "half_copy",
    "left_pad",
    "quantized_copy",
    "sampling_verify",
    "speculative_generate",
]
