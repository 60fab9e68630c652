"""Re-quantizing a changed weight with a module's existing scheme (pure tensor functions).

Merging a LoRA or IA3 adapter into a quantized base produces a float weight ``W + delta`` that must go
back onto the same scheme (bits, group size, symmetric, scale dtype, kept outliers). Rounding it on a
fresh min/max grid (what a naive merge does) adds a whole new quantization error on top of the delta,
and rounding it on the old grid drops every delta smaller than half a step. `requantize_weight` does
better than both, per group:

* ``"refit"`` starts from the module's current scale and minimum and alternates rounding the codes
  with a least-squares refit of the group's scale and minimum to the target (codes fixed), keeping
  the best iterate; it also tries a fresh min/max grid and keeps, per group, whichever reconstructs
  the target with the smaller squared error;
* ``"rtn"`` is the plain fresh round-to-nearest grid, for comparison.

A module with integer zero points (``zero_point="integer"``) keeps them: the refit works with the
float32 minimum ``-zero * scale`` and snaps every refitted minimum to the nearest whole step
(`snap_minimum`), so every candidate grid, and the stored result, has an integer zero point.
"""

from __future__ import annotations

import torch

from .scheme import (
    QuantizedWeight,
    check_zero_point,
    group_params,
    grouped,
    masked_range,
    pack_groups,
    reconstruct,
    round_codes,
    snap_minimum,
)

REQUANTIZE_METHODS = ("refit", "rtn")


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def _refit(
    wg: torch.Tensor,
    mask: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype,
    integer: bool = False,
):
    """Least-squares scale (and minimum) per group ``[..., G, 1]`` for fixed ``codes``; ``integer``: the
    minimum snapped to the nearest integer zero point of the new scale."""
    m = mask.float()
    count = m.sum(-1, keepdim=True).clamp_min(1.0)
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24
    if minimum is None:
        c = codes - 2 ** (bits - 1)
        denom = (c * c * m).sum(-1, keepdim=True)
        s = (c * wg * m).sum(-1, keepdim=True) / denom.clamp_min(1e-12)
        s = torch.where((denom > 0) & (s > tiny), s, scale)
        return _stored(s, dtype), None
    c_mean = (codes * m).sum(-1, keepdim=True) / count
    t_mean = (wg * m).sum(-1, keepdim=True) / count
    var = (((codes - c_mean) ** 2) * m).sum(-1, keepdim=True)
    cov = ((codes - c_mean) * (wg - t_mean) * m).sum(-1, keepdim=True)
    s = torch.where((var > 0) & (cov / var.clamp_min(1e-12) > tiny), cov / var.clamp_min(1e-12), scale)
    s = _stored(s, dtype)
    if integer:
        return s, snap_minimum(t_mean - s * c_mean, s, bits)
    return s, _stored(t_mean - s * c_mean, dtype)


def requantize_weight(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    method: str = "refit",
    iters: int = 8,
    zero_point: str = "float",
    zero: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with the given scheme, starting from the previous grid
    (``scale``/``minimum`` ``[out, G]``, or ``scale``/``zero`` for ``zero_point="integer"``) when
    ``method="refit"``. ``exclude`` (bool ``[out, in]``) marks weights stored exactly elsewhere (outliers).
    Returns a `QuantizedWeight` without outliers (with integer zero points for ``zero_point="integer"``)."""
    if method not in REQUANTIZE_METHODS:
        raise ValueError(f"method={method!r} is not allowed; allowed values: {', '.join(REQUANTIZE_METHODS)}")
    check_zero_point(zero_point)
    integer = not symmetric and zero_point == "integer"
    if method == "refit" and (scale is None or (not symmetric and (zero if integer else minimum) is None)):
        raise ValueError(
            "method='refit' needs the previous scale (and minimum, or zero for integer zero points, for "
            "asymmetric schemes)"
        )
    w = weight.detach().float()
    out, n = w.shape
    wg, mask = grouped(w, group_size)
    if exclude is not None:
        kept, _ = grouped(exclude.to(w.device).float(), group_size)
        mask = mask & (kept == 0)
    fm = mask.float()

    def error(s, m):
        return (((reconstruct(round_codes(wg, s, m, bits), s, m, bits) - wg) ** 2) * fm).sum(-1, keepdim=True)

    wmin, wmax = masked_range(wg, mask)
    best_s, best_m = group_params(wmin, wmax, bits, symmetric, scale_dtype, zero_point)
    best_err = error(best_s, best_m)
    if method == "refit":
        s = scale.float().unsqueeze(-1).to(w.device)
        if symmetric:
            m = None
        elif integer:
            m = -(zero.float().unsqueeze(-1).to(w.device) * s)
        else:
            m = minimum.float().unsqueeze(-1).to(w.device)
        for _ in range(iters + 1):
            err = error(s, m)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if m is not None:
                best_m = torch.where(better, m, best_m)
            s, m = _refit(wg, mask, round_codes(wg, s, m, bits), s, m, bits, scale_dtype, integer)
    return pack_groups(wg, best_s, best_m, bits, group_size, n, scale_dtype, zero_point)


def requantize_linear(module, weight: torch.Tensor, method: str = "refit") -> None:
    """Store ``weight [out, in]`` (float) in the `QuantLinear` ``module`` with its own scheme: codes,
    scales and minima (or integer zero points) re-fitted by `requantize_weight`; kept outliers stay at their positions and take
    the new weight's values there (exactly, in float16). An act-order module keeps its column order."""
    perm = module.weight_perm
    if perm is not None:  # quantize in stored column order, where the groups are
        weight = weight.index_select(1, perm.long().to(weight.device))
    exclude = None
    index = module.weight_outlier_index
    if index is not None:
        exclude = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        exclude.scatter_(1, index.long().to(weight.device), True)
    q = requantize_weight(
        weight,
        bits=module.bits,
        group_size=module.group_size,
        symmetric=module.symmetric,
        scale_dtype=module.weight_scale.dtype,
        scale=module.weight_scale.detach(),
        minimum=None if module.weight_min is None else module.weight_min.detach(),
        exclude=exclude,
        method=method,
        zero_point=getattr(module, "zero_point", "float"),
        zero=None if getattr(module, "weight_zero", None) is None else module.weight_zero.detach(),
    )
    if index is not None:
        q.outlier_index = index.detach().clone()
        q.outlier_value = weight.detach().gather(1, index.long().to(weight.device)).to(torch.float16)
    if perm is not None:
        q.perm = perm.detach().clone()
    module.load_quantized(q)
