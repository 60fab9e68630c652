"""Attention functions registered with transformers' ``AttentionInterface`` (see `registry.py`).

``hf_efficiency_blockwise``: exact attention that never materializes the ``q x kv`` score matrix (the
FlashAttention algorithm). The name avoids "flash": transformers 5.24 treats any implementation name
containing "flash" as a flash-attn kernel to import (``is_flash_attention_requested``) and fails
with "Could not find the currently requested flash attention implementation". It runs
torch's fused ``scaled_dot_product_attention`` kernels (through transformers' own sdpa function) where
they apply, and the block-wise online-softmax implementation of `blockwise.py` otherwise: logit
soft-capping (Gemma-2), or when forced with ``HF_EFFICIENCY_ATTENTION_PATH=blockwise``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .blockwise import blockwise_attention

BLOCKWISE = "hf_efficiency_blockwise"
LOWRANK = "hf_efficiency_lowrank"
#: landmarks, window and sinks of ``hf_efficiency_lowrank`` when the model's config sets none
LOWRANK_DEFAULTS = {"landmarks": 64, "window": 256, "sinks": 4}
ATTENTION_PATHS = ("auto", "sdpa", "blockwise")


def attention_path(softcap: float | None) -> str:
    """The path ``hf_efficiency_blockwise`` takes: ``HF_EFFICIENCY_ATTENTION_PATH`` (auto|sdpa|blockwise)."""
    forced = os.environ.get("HF_EFFICIENCY_ATTENTION_PATH", "auto")
    if forced not in ATTENTION_PATHS:
        raise ValueError(
            f"HF_EFFICIENCY_ATTENTION_PATH={forced!r} is not allowed; allowed values: {', '.join(ATTENTION_PATHS)}"
        )
    if forced == "sdpa" and softcap is not None:
        raise ValueError("HF_EFFICIENCY_ATTENTION_PATH=sdpa cannot apply logit soft-capping; use auto or blockwise")
    if forced != "auto":
        return forced
    return "blockwise" if softcap is not None else "sdpa"


def blockwise_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``(out [b, q, h, d], None)``.

    ``attention_mask`` is the boolean 4-D mask of transformers' ``sdpa_mask`` (registered for this
    name), or ``None`` when the pattern is plainly causal.
    """
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"{BLOCKWISE} never forms the attention matrix; use attn_implementation='eager' for output_attentions=True"
        )
    path = attention_path(softcap)
    if path == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout and module.training:
        raise ValueError(f"{BLOCKWISE}'s block-wise path has no attention dropout; set attention_dropout=0 or use sdpa")
    mask = attention_mask
    if mask is not None:
        if mask.dtype != torch.bool:  # an additive float mask: 0 where allowed
            mask = mask == 0
        mask = mask[..., : key.shape[2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = blockwise_attention(
        query, key, value, mask=mask, causal=causal, scale=scaling, softcap=softcap, sliding_window=sliding_window
    )
    return out.transpose(1, 2).contiguous(), None


def lowrank_settings(module: nn.Module) -> dict[str, int]:
    """``landmarks``, ``window`` and ``sinks`` from the model's ``EfficiencyConfig(attention=...)``."""
    from ..config import saved_section

    spec = saved_section(module, "attention")
    if spec is None:
        return dict(LOWRANK_DEFAULTS)
    return {"landmarks": spec.lowrank_landmarks, "window": spec.lowrank_window, "sinks": spec.lowrank_sinks}


def lowrank_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function of ``hf_efficiency_lowrank`` (see `lowrank.py`).

    A sliding-window layer (Gemma 3's local layers, Mistral) is local already: it is computed exactly
    (the block-wise algorithm with its window), and only full-attention layers are approximated.
    """
    from .lowrank import lowrank_attention

    if softcap is not None or kwargs.get("output_attentions"):
        raise ValueError(f"{LOWRANK} supports neither logit soft-capping nor output_attentions")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{LOWRANK} approximates causal (decoder) attention only")
    mask = None
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask[..., : key.shape[2]]
    if sliding_window is not None:
        if dropout and module.training:
            raise ValueError(f"{LOWRANK} has no attention dropout on sliding-window layers; set attention_dropout=0")
        out = blockwise_attention(
            query, key, value, mask=mask, causal=True, scale=scaling, sliding_window=sliding_window
        )
        return out.transpose(1, 2).contiguous(), None
    # the last query sees every non-padding key (a full-attention layer's mask)
    valid = None if mask is None else mask[:, 0, -1]
    out = lowrank_attention(query, key, value, key_valid=valid, scale=scaling, **lowrank_settings(module))
    return out.transpose(1, 2).contiguous(), None
