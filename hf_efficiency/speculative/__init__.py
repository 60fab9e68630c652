"""Speculative decoding (issue 6, in progress): so far the verification rules in ``verify.py``."""

from .verify import greedy_verify, sampling_verify

__all__ = ["greedy_verify", "sampling_verify"]
