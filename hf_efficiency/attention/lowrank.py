"""Training-free low-rank attention: exact on a recent window, segment-pooled landmarks for the past.

The keys and values of the distant past are projected along the sequence onto ``landmarks`` rows: the
sequence is cut into segments of ``S = ceil(kv / landmarks)`` positions and each segment is replaced by
its mean key and mean value (padding excluded). A query attends exactly to the keys of its own segment
and of the ``ceil(window / S)`` segments before it (causally masked), and to the landmarks of every
earlier segment. Each landmark's score gets ``+ log(count)``, so it stands for all ``count`` keys it
pools (exact when those keys are equal). Only whole past segments are pooled, so no query sees the
future. The cost per query is ``O(window + landmarks)`` keys instead of ``O(kv)``. With ``landmarks >=
kv`` (one key per segment) or ``window >= kv`` the result is exact. The first ``sinks`` positions are
always attended exactly (StreamingLLM's attention sinks).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lowrank_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    landmarks: int,
    window: int,
    sinks: int = 4,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal attention ``[b, h, q, d]`` approximated beyond ``window`` with ``landmarks`` pooled rows.

    ``sinks``: the first positions, always attended exactly (language models put much of their attention
    mass on them; pooling them with their neighbours would blur it). ``key_valid``: optional boolean
    ``[b, kv]`` (False = padding). The ``q`` queries are the last ``q``
    of the ``kv`` positions; key/value heads may be fewer than query heads (grouped-query attention).
    """
    if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 1:
        raise ValueError(f"landmarks={landmarks!r} is not allowed; allowed values: integers >= 1")
    for name, value_ in (("window", window), ("sinks", sinks)):
        if isinstance(value_, bool) or not isinstance(value_, int) or value_ < 0:
            raise ValueError(f"{name}={value_!r} is not allowed; allowed values: integers >= 0")
    b, h, q, d = query.shape
    h_kv, kv = key.shape[1], key.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    groups, offset = h // h_kv, kv - q
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    seg = max(1, math.ceil(kv / landmarks))
    nseg = math.ceil(kv / seg)
    pad = nseg * seg - kv
    valid = torch.ones(b, kv, dtype=torch.bool, device=key.device) if key_valid is None else key_valid.bool()
    kf, vf = key.float(), value.float()
    if pad:
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        vf = torch.nn.functional.pad(vf, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    pooled = valid.clone()
    pooled[:, :sinks] = False  # sinks stay exact, never pooled
    w = pooled.reshape(b, 1, nseg, seg, 1).float()
    counts = w.sum(dim=3)  # [b, 1, nseg, 1]
    kbar = (kf.reshape(b, h_kv, nseg, seg, -1) * w).sum(3) / counts.clamp(min=1)
    vbar = (vf.reshape(b, h_kv, nseg, seg, -1) * w).sum(3) / counts.clamp(min=1)
    log_count = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))[..., 0]  # [b,1,nseg]
    near = math.ceil(window / seg)
    qg = query.reshape(b, h_kv, groups, q, d)
    out = torch.empty(b, h_kv, groups, q, value.shape[-1], dtype=query.dtype, device=query.device)
    first = offset // seg
    for s in range(first, nseg):  # query block = the queries inside segment s
        p0, p1 = max(s * seg, offset), min((s + 1) * seg, kv)
        if p0 >= p1:
            continue
        qb = qg[:, :, :, p0 - offset : p1 - offset].float() * scale
        e0 = max(0, s - near) * seg  # exact keys: the sinks before e0, then [e0, p1)
        idx = torch.cat([torch.arange(min(sinks, e0), device=query.device), torch.arange(e0, p1, device=query.device)])
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qb, kf[:, :, idx])
        pos_q = torch.arange(p0, p1, device=query.device)[:, None]
        allowed = (idx[None, :] <= pos_q)[None, None, None] & valid[:, idx][:, None, None, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        far = max(0, s - near)  # landmarks of segments [0, far)
        if far:
            land = torch.einsum("bhgqd,bhkd->bhgqk", qb, kbar[:, :, :far]) + log_count[:, :, None, None, :far]
            scores = torch.cat([land, scores], dim=-1)
            values = torch.cat([vbar[:, :, :far], vf[:, :, idx]], dim=2)
        else:
            values = vf[:, :, idx]
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully padded query row gives zeros
        out[:, :, :, p0 - offset : p1 - offset] = torch.einsum("bhgqk,bhkd->bhgqd", probs, values).to(query.dtype)
    return out.reshape(b, h, q, -1)
