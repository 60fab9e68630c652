"""Speculative decoding (issue 6, in progress): the verification rules (``verify.py``) and a batch-1
draft-then-verify loop over two causal LMs with cropped KV caches (``loop.py``)."""

from .loop import SpeculativeStats, speculative_generate
from .verify import greedy_verify, sampling_verify

__all__ = ["SpeculativeStats", "greedy_verify", "sampling_verify", "speculative_generate"]
