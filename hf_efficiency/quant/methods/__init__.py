"""One entry point from a `QuantizationSpec` to an algorithm: ``quantize_matrix``.

Every method is a pure function of a weight matrix (and, for the calibrated ones, statistics of
its input) returning the foundation's packed `QuantizedWeight`; this module only dispatches and
adds outlier keeping around them.
"""

from __future__ import annotations

import torch

from ...config import QuantizationSpec
from ..core.outliers import attach_outliers, outlier_scores, select_outliers
from ..core.scheme import QuantizedWeight, quantize_weight


def quantize_matrix(
    weight: torch.Tensor,
    spec: QuantizationSpec,
    bits: int,
    *,
    scale_dtype: torch.dtype,
    outliers: int = 0,
    hessian: torch.Tensor | None = None,
    act_rms: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with ``spec.method`` at ``bits``.

    ``hessian`` (``X^T X / n``) is required by ``gptq``; ``act_rms`` (per input channel RMS of the
    calibration activations) weights the outlier selection when given. ``awq`` weights arrive
    already scaled and clipped by the pipeline, so they are rounded here like ``rtn``.
    """
    w = weight.detach().float()
    exclude = index = None
    if outliers:
        exclude, index = select_outliers(outlier_scores(w, act_rms), outliers)
    kept = w
    method = spec.method
    if method in ("rtn", "awq"):
        clip = spec.clip if method == "rtn" else "none"
        q = quantize_weight(
            w,
            bits,
            spec.group_size,
            spec.symmetric,
            clip,
            spec.clip_grid,
            spec.clip_max_shrink,
            scale_dtype,
            exclude=exclude,
        )
    elif method == "hqq":
        from .hqq import hqq_quantize

        q = hqq_quantize(
            w,
            bits,
            spec.group_size,
            scale_dtype=scale_dtype,
            iters=spec.hqq_iters,
            optimize_scale=spec.hqq_optimize_scale,
            exclude=exclude,
        )
    elif method == "gptq":
        from .gptq import gptq_quantize

        if hessian is None:
            raise ValueError(
                "gptq needs the input Hessian (X^T X) of every quantized linear: run it with calibration data"
            )
        q, kept_values = gptq_quantize(
            w,
            hessian,
            bits,
            spec.group_size,
            spec.symmetric,
            scale_dtype=scale_dtype,
            damp=spec.gptq_damp,
            act_order=spec.gptq_act_order,
            block_size=spec.gptq_block_size,
            clip=spec.clip,
            clip_grid=spec.clip_grid,
            clip_max_shrink=spec.clip_max_shrink,
            exclude=exclude,
        )
        if kept_values is not None:
            kept = kept_values
    else:  # pragma: no cover - validated by the config
        raise ValueError(f"unknown quantization method {method!r}")
    if index is not None:
        q = attach_outliers(q, index, kept)
    return q
