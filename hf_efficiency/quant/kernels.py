"""Device-specific matmul paths for `QuantLinear` (the only module with device-specific code).

Paths, chosen per call by :func:`select_path`:

* ``"dequant"`` (any device, the reference): unpack codes, rebuild the float weight in the
  activation dtype, ``F.linear``. On CPU this is the path taken (see README for its speed).
* ``"cuda_int8"``: ``torch._weight_int8pack_mm`` for symmetric 8-bit per-channel weights with
  fp16/bf16 activations on CUDA.
* ``"cuda_int4"``: torch's tinygemm ``torch._weight_int4pack_mm`` for 4-bit group-wise weights
  (groups 32-256 dividing ``in_features``) with bf16 activations on CUDA.

Kernel layouts are built once per module and cached outside the state dict, so the saved
format never changes. ``HF_EFFICIENCY_KERNEL=dequant`` forces the reference path.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .packing import unpack
from .scheme import dequantize_codes

if TYPE_CHECKING:
    from .linear import QuantLinear

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_INNER_K_TILES = 8


def select_path(module: "QuantLinear", x: torch.Tensor) -> str:
    """Name of the matmul path used for ``module(x)``."""
    forced = os.environ.get("HF_EFFICIENCY_KERNEL")
    if forced:
        return forced
    if x.device.type != "cuda":
        return "dequant"
    if module.bits == 8 and module.symmetric and module.group_size is None and x.dtype in (torch.float16, torch.bfloat16):
        return "cuda_int8"
    if (
        module.bits == 4
        and x.dtype == torch.bfloat16
        and module.group_size in INT4_GROUP_SIZES
        and module.in_features % module.group_size == 0
        and module.in_features % (16 * INT4_INNER_K_TILES) == 0
        and module.out_features % 8 == 0
    ):
        return "cuda_int4"
    return "dequant"


def dequantize_weight(module: "QuantLinear", dtype: torch.dtype) -> torch.Tensor:
    """The module's float weight ``[out, in]`` in ``dtype``."""
    codes = unpack(module.weight, module.bits, module.in_features)
    return dequantize_codes(codes, module.weight_scale, module.weight_min, module.bits, module.group_size, dtype)


def int8_kernel_layout(module: "QuantLinear", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 weight ``[out, in]`` and per-channel scales for ``_weight_int8pack_mm``."""
    codes = unpack(module.weight, 8, module.in_features).to(torch.int16) - 128
    return codes.to(torch.int8).contiguous(), module.weight_scale[:, 0].to(dtype).contiguous()


def int4_scales_and_zeros(module: "QuantLinear", dtype: torch.dtype) -> torch.Tensor:
    """tinygemm's ``[G, out, 2]`` (scale, zero) with ``w = (u - 8) * scale + zero``."""
    scale = module.weight_scale.float()
    if module.weight_min is None:
        zero = torch.zeros_like(scale)
    else:
        zero = module.weight_min.float() + 8 * scale
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_kernel_layout(module: "QuantLinear") -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm-packed weight and scales/zeros for ``_weight_int4pack_mm`` (CUDA)."""
    codes = unpack(module.weight, 4, module.in_features).to(torch.uint8)
    packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, INT4_INNER_K_TILES)
    return weight, int4_scales_and_zeros(module, torch.bfloat16)


def _cached(module: "QuantLinear", key: str, build):
    cache = module.__dict__.setdefault("_kernel_cache", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def quant_linear_forward(module: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """``x @ W_hat.T + b`` through the path :func:`select_path` picks."""
    path = select_path(module, x)
    module.last_path = path
    if path == "cuda_int8":
        w, s = _cached(module, f"int8-{x.dtype}", lambda: int8_kernel_layout(module, x.dtype))
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, s)
        out = out.reshape(*x.shape[:-1], module.out_features)
    elif path == "cuda_int4":
        w, sz = _cached(module, "int4", lambda: int4_kernel_layout(module))
        out = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), w, module.group_size, sz)
        out = out.reshape(*x.shape[:-1], module.out_features)
    elif path == "dequant":
        return F.linear(x, dequantize_weight(module, x.dtype), module.bias)
    else:
        raise ValueError(f"unknown kernel path {path!r}; allowed values: dequant, cuda_int8, cuda_int4")
    if module.bias is not None:
        out = out + module.bias.to(out.dtype)
    return out
