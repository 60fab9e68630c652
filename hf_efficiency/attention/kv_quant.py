"""Per-token, per-group quantization of key/value states (pure tensor functions).

A state ``[b, h, t, d]`` is split along ``d`` into groups of ``group_size`` channels; each token's group
gets an asymmetric scale and minimum (float16; float32 for a call whose states span beyond float16's range,
about +-65504, where a float16 scale or minimum would be infinite) and ``bits``-wide codes (8, 4 or 2), packed into bytes
(two 4-bit or four 2-bit codes per byte). Each token is quantized once, when it enters the cache, so
appending and cropping never re-quantize (no drift), unlike caches that re-quantize the whole history.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import KV_BITS

_FLOAT16_MAX = torch.finfo(torch.float16).max


def check_kv_args(bits: int, group_size: int, head_dim: int | None = None) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV cache bits={bits!r} is not supported; allowed values: {', '.join(map(str, KV_BITS))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"KV cache group_size={group_size!r} is not allowed; allowed values: integers >= 1")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"KV cache group_size={group_size} must divide the head dimension {head_dim}")


def quantize_kv(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes uint8 [b, h, t, d * bits / 8], scale [b, h, t, G], minimum [b, h, t, G])`` of ``x``; scale and
    minimum are float16 unless one of them would overflow it (then float32 for this call; appending to a cache
    promotes the stored ones)."""
    b, h, t, d = x.shape
    check_kv_args(bits, group_size, d)
    xg = x.float().reshape(b, h, t, d // group_size, group_size)
    lo = xg.amin(dim=-1, keepdim=True)
    hi = xg.amax(dim=-1, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    codes = torch.round((xg - lo) / scale).clamp(0, qmax).to(torch.uint8).reshape(b, h, t, d)
    per_byte = 8 // bits
    if per_byte > 1:
        codes = codes.reshape(b, h, t, d // per_byte, per_byte)
        shifts = torch.arange(per_byte, device=x.device, dtype=torch.uint8) * bits
        codes = (codes << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: sum == or
    scale, lo = scale.squeeze(-1), lo.squeeze(-1)
    fits = bool((scale <= _FLOAT16_MAX).all()) and bool((lo.abs() <= _FLOAT16_MAX).all())
    store = torch.float16 if fits else torch.float32
    return codes.contiguous(), scale.to(store), lo.to(store)


def dequantize_kv(
    codes: Tensor, scale: Tensor, minimum: Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> Tensor:
    """The ``[b, h, t, d]`` states in ``dtype`` from `quantize_kv`'s output."""
    b, h, t, _ = codes.shape
    per_byte = 8 // bits
    if per_byte > 1:
        shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
        codes = ((codes[..., None] >> shifts) & ((1 << bits) - 1)).reshape(b, h, t, -1)
    d = codes.shape[-1]
    xg = codes.reshape(b, h, t, d // group_size, group_size).float()
    x = xg * scale.float()[..., None] + minimum.float()[..., None]
    return x.reshape(b, h, t, d).to(dtype)


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, bits: int | None, group_size: int, float_bytes: int = 2
) -> int:
    """Bytes one token occupies in the cache across all layers (keys and values): codes plus float16
    scale and minimum per group, or ``float_bytes`` per element for an unquantized cache (``bits=None``)."""
    per_state = head_dim * float_bytes if bits is None else head_dim * bits // 8 + 2 * 2 * (head_dim // group_size)
    return 2 * num_layers * num_kv_heads * per_state
