"""Exact attention computed block by block with an online softmax (the FlashAttention recurrence).

Pure tensor functions, no transformers import. For each block of queries the keys are visited in
blocks; a running maximum ``m``, normalizer ``l`` and un-normalized output ``acc`` are rescaled as each
key block arrives, so the largest temporary is ``[b, h, q_block, k_block]`` instead of ``[b, h, q, kv]``.
Key blocks that the causal or sliding-window structure masks entirely are skipped.

Conventions (those of transformers' attention interface):
  query ``[b, h, q, d]``; key/value ``[b, h_kv, kv, d]`` with ``h % h_kv == 0`` (grouped-query
  attention: query head ``i`` reads key/value head ``i // (h // h_kv)``); the ``q`` queries are the last
  ``q`` of the ``kv`` positions (decoding with a cache: ``q < kv``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _block_mask(
    mask: Tensor | None,
    causal: bool,
    window: int | None,
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    offset: int,
    device: torch.device,
) -> Tensor | None:
    """Boolean ``[b or 1, 1, q1-q0, k1-k0]`` (True = attend) for one block, or None when all is allowed."""
    allowed = None
    if causal or window is not None:
        qi = torch.arange(q0, q1, device=device)[:, None] + offset  # absolute positions of the queries
        kj = torch.arange(k0, k1, device=device)[None, :]
        allowed = kj <= qi if causal else torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
        if window is not None:
            allowed = allowed & (qi - kj < window)
        allowed = allowed[None, None]
    if mask is not None:
        m = mask[..., q0:q1, k0:k1]
        allowed = m if allowed is None else (allowed & m)
    return allowed


def blockwise_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    q_block: int = 256,
    k_block: int = 512,
) -> Tensor:
    """Exact softmax attention ``[b, h, q, d]`` without materializing the ``q x kv`` score matrix.

    ``mask``: optional boolean ``[b or 1, 1, q, kv]`` (True = attend), combined with ``causal`` (query
    ``i`` sees keys up to its absolute position ``kv - q + i``) and ``sliding_window`` (keys less than
    ``sliding_window`` positions back). ``softcap``: scores become ``softcap * tanh(score / softcap)``
    (Gemma-2 style). Fully masked query rows return zeros. Accumulates in float32.
    """
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            f"expected query [b, h, q, d] and key/value [b, h_kv, kv, d], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, h, q, d = query.shape
    h_kv, kv = key.shape[1], key.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    if q_block < 1 or k_block < 1:
        raise ValueError(f"block sizes must be >= 1, got q_block={q_block}, k_block={k_block}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}")
    groups = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    offset = kv - q
    out_dtype = query.dtype
    # [b, h_kv, groups, q, d]: each key/value head serves its group of query heads without repeating K/V
    qg = query.reshape(b, h_kv, groups, q, d)
    out = torch.empty(b, h_kv, groups, q, value.shape[-1], dtype=out_dtype, device=query.device)
    for q0 in range(0, q, q_block):
        q1 = min(q, q0 + q_block)
        qb = qg[:, :, :, q0:q1].float() * scale
        m = torch.full((b, h_kv, groups, q1 - q0, 1), float("-inf"), device=query.device)
        l = torch.zeros_like(m)  # noqa: E741 - the softmax normalizer's usual name
        acc = torch.zeros(b, h_kv, groups, q1 - q0, value.shape[-1], device=query.device)
        k_end = min(kv, q1 + offset) if causal else kv  # keys after the last query's position are masked
        k_start = 0
        if sliding_window is not None:
            k_start = max(0, q0 + offset - sliding_window + 1)
        for k0 in range(k_start - k_start % k_block, k_end, k_block):
            k1 = min(k_end, k0 + k_block)
            s = torch.einsum("bhgqd,bhkd->bhgqk", qb, key[:, :, k0:k1].float())
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            allowed = _block_mask(mask, causal, sliding_window, q0, q1, k0, k1, offset, query.device)
            if allowed is not None:
                s = s.masked_fill(~allowed[:, :, None], float("-inf"))  # [b|1, 1, 1, qb, kb] over groups
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing yet
            p = torch.exp(s - safe)
            correction = torch.exp(torch.where(torch.isinf(m), torch.full_like(m, float("-inf")), m - safe))
            l = l * correction + p.sum(dim=-1, keepdim=True)  # noqa: E741
            acc = acc * correction + torch.einsum("bhgqk,bhkd->bhgqd", p, value[:, :, k0:k1].float())
            m = m_new
        out[:, :, :, q0:q1] = torch.where(
            l > 0, acc / l.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(acc)
        ).to(out_dtype)
    return out.reshape(b, h, q, -1)
