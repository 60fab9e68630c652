"""The quantization methods and their table.

``METHODS`` maps each method's name to its `QuantMethod` (see `base`): config validation, the
calibrated pipeline, the command line and the model card read it. A method is one module of this
package defining ``METHOD``; adding one is that module plus one line in ``_TABLE``.

`quantize_matrix` is the one entry from a `QuantizationSpec` to a method's per-matrix step; it adds
outlier keeping around every method.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

from ..core.outliers import attach_outliers, outlier_scores, select_outliers
from ..core.scheme import QuantizedWeight
from .base import MethodOptions, OptionError, QuantMethod, WeightFormat

if TYPE_CHECKING:
    from ...config import QuantizationSpec

#: The method table: one line per method, naming its module in this package.
_TABLE = (
    "rtn",
    "hqq",
    "awq",
    "gptq",
    "autoround",
)

METHODS: dict[str, QuantMethod] = {
    m.name: m for m in (importlib.import_module(f"{__name__}.{module}").METHOD for module in _TABLE)
}


def get_method(name: str) -> QuantMethod:
    """The method called ``name``; a ValueError lists the allowed names."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization method {name!r}; allowed values: {', '.join(METHODS)}") from None


def weight_format(spec: Any, bits: int, scale_dtype: torch.dtype) -> WeightFormat:
    """The `WeightFormat` of one matrix at ``bits`` under ``spec`` (a `QuantizationSpec`)."""
    return WeightFormat(
        bits=bits,
        group_size=spec.group_size,
        symmetric=spec.symmetric,
        scale_dtype=scale_dtype,
        clip=spec.clip,
        clip_grid=spec.clip_grid,
        clip_max_shrink=spec.clip_max_shrink,
        zero_point=getattr(spec, "zero_point", "float"),
    )


def quantize_matrix(
    weight: torch.Tensor,
    spec: QuantizationSpec,
    bits: int,
    *,
    scale_dtype: torch.dtype,
    outliers: int = 0,
    hessian: torch.Tensor | None = None,
    act_rms: torch.Tensor | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with ``spec.method`` at ``bits``.

    ``hessian`` (``X^T X / n``) is required by methods with ``needs_hessian`` (``gptq``); ``act_rms``
    (per input channel RMS of the calibration activations) weights the outlier selection when given.
    A weight holding inf or NaN, or one whose scales or minima overflow ``scale_dtype``, raises
    `NonFiniteError` naming ``name`` (the module) instead of storing a scale that reads back as NaN.
    """
    method = get_method(spec.method)
    w = weight.detach().float()
    check_weight_finite(w, name)
    exclude = index = None
    if outliers:
        exclude, index = select_outliers(outlier_scores(w, act_rms), outliers)
    q, kept_values = method.quantize(
        w, weight_format(spec, bits, scale_dtype), spec.options, exclude=exclude, hessian=hessian
    )
    if index is not None:
        q = attach_outliers(q, index, w if kept_values is None else kept_values)
    check_quantized_finite(q, w, name)
    return q


class NonFiniteError(ValueError):
    """A weight, scale, minimum or kept outlier value is inf or NaN."""


def check_weight_finite(w: torch.Tensor, name: str) -> None:
    """Raise `NonFiniteError` when the float weight ``w`` of module ``name`` holds inf or NaN."""
    if w.device.type == "meta" or w.numel() == 0:
        return
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(
            f"{name}: the float weight holds {int(bad.sum())} inf/NaN value(s) (first at row {row}, column {col}: "
            f"{float(w[row, col])}); the checkpoint is corrupt or the model diverged, it cannot be quantized"
        )


def check_quantized_finite(q: QuantizedWeight, w: torch.Tensor, name: str) -> None:
    """Raise `NonFiniteError` when a scale, minimum or kept outlier value of ``q`` is not finite: with a
    finite weight that means it overflowed its storage dtype (float16 stops at 65504)."""
    for label, t in (("weight_scale", q.scale), ("weight_min", q.minimum), ("weight_outlier_value", q.outlier_value)):
        if t is None or t.device.type == "meta" or bool(torch.isfinite(t).all()):
            continue
        peak = float(w.abs().max()) if w.numel() else 0.0
        raise NonFiniteError(
            f"{name}: {label} is not finite in {str(t.dtype).removeprefix('torch.')} (largest |weight| "
            f"{peak:.4g}); a {str(t.dtype).removeprefix('torch.')} {label} overflows for weights this large: "
            "use quantization.scale_dtype='float32' or 'bfloat16'"
        )


__all__ = [
    "METHODS",
    "MethodOptions",
    "NonFiniteError",
    "OptionError",
    "QuantMethod",
    "WeightFormat",
    "get_method",
    "quantize_matrix",
]
