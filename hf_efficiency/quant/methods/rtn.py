"""``rtn``: round-to-nearest on each group's range, optionally with the MSE clip search."""

from __future__ import annotations

import torch

from ..core.scheme import QuantizedWeight, quantize_weight
from .base import MethodOptions, NoOptions, QuantMethod, WeightFormat


def round_to_nearest(weight: torch.Tensor, fmt: WeightFormat, exclude: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest of ``weight`` in ``fmt`` (its clip search included)."""
    return quantize_weight(
        weight,
        fmt.bits,
        fmt.group_size,
        fmt.symmetric,
        fmt.clip,
        fmt.clip_grid,
        fmt.clip_max_shrink,
        fmt.scale_dtype,
        exclude=exclude,
        zero_point=fmt.zero_point,
    )


class RoundToNearest(QuantMethod):
    name = "rtn"
    summary = "round-to-nearest on each group's range (optionally an MSE clip search); no data needed"
    options = NoOptions
    supports_int8_activations = True

    def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
        return round_to_nearest(weight, fmt, exclude), None

    def describe(self, options: MethodOptions, clip: str) -> str:
        span = "MSE search of the clipping range" if clip == "mse" else "full weight range"
        return f"round-to-nearest (`rtn`) quantization of the linear weights ({span})"


METHOD = RoundToNearest()
