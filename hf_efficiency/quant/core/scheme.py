"""Group-wise integer quantization of weight matrices (pure tensor functions).

A weight ``W [out, in]`` is split along the input dimension into ``G = ceil(in / g)`` groups
(one group of ``in`` when per channel); the last group may be partial. Codes are unsigned:

* asymmetric, float minimum (``zero_point="float"``): ``w_hat = u * scale + minimum``,
  ``u in [0, 2**b - 1]``
* asymmetric, integer zero point (``zero_point="integer"``, the GPTQ/AWQ/compressed-tensors grid):
  ``w_hat = (u - zero) * scale`` with ``zero`` an integer in ``[0, 2**b - 1]`` stored as uint8
* symmetric:  ``w_hat = (u - 2**(b-1)) * scale`` (absmax scale, implicit zero point)

``scale`` and ``minimum`` are stored in a compact float dtype; codes are computed against the
*stored* (rounded) scale and minimum so that dequantization is exactly what was optimized.

Integer zero points are handled by the same code as float minima: every search works with the float32
minimum ``-zero * scale``, which for a 16-bit scale is exact in float32 (at most 8 + 11 significant bits),
as is ``u * scale + (-zero * scale) == (u - zero) * scale``. So the reconstruction of the searches, the
float32 de-quantization and the fused CPU kernel (all ``u * scale + minimum``) are bit-identical to
``(u - zero) * scale``. (With float32 scales the float32 de-quantization is ``u * scale + (-zero * scale)``,
equal to ``(u - zero) * scale`` up to one float32 rounding.) The range of an integer-zero group always
includes 0 (``min(wmin, 0)``, ``max(wmax, 0)``, as GPTQ does): a group that does not straddle 0 would
otherwise need a zero point outside ``[0, 2**b - 1]``. Groups that straddle 0 (almost all) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack, unpack

#: how an asymmetric grid stores its offset (``quantization.zero_point``)
ZERO_POINTS = ("float", "integer")


def check_zero_point(zero_point: str) -> None:
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point={zero_point!r} is not allowed; allowed values: {', '.join(ZERO_POINTS)}")


@dataclass
class QuantizedWeight:
    """Packed result of quantizing one weight matrix."""

    packed: torch.Tensor  # int32 [out, words]
    scale: torch.Tensor  # [out, G]
    minimum: torch.Tensor | None  # [out, G] (asymmetric float-minimum grids only)
    bits: int
    group_size: int | None
    in_features: int
    outlier_index: torch.Tensor | None = None  # int16/int32 [out, k]: columns kept exactly
    outlier_value: torch.Tensor | None = None  # float16 [out, k]: their values
    perm: torch.Tensor | None = None  # int32 [in]: stored column j holds input feature perm[j] (act-order)
    zero: torch.Tensor | None = None  # uint8 [out, G]: integer zero points (then ``minimum`` is None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack(self.packed, self.bits, self.in_features)
        w = dequantize_codes(codes, self.scale, self.minimum, self.bits, self.group_size, dtype, zero=self.zero)
        return apply_outliers(unpermute_columns(w, self.perm), self.outlier_index, self.outlier_value)


def unpermute_columns(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Columns of ``w`` back in input-feature order when stored column ``j`` holds feature ``perm[j]``
    (GPTQ act-order checkpoints keep each group's columns together this way)."""
    if perm is None:
        return w
    return torch.empty_like(w).index_copy_(1, perm.to(device=w.device, dtype=torch.long), w)


def apply_outliers(w: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor:
    """Overwrite ``w [out, in]`` at the kept (outlier) positions: row ``r`` gets ``value[r, j]`` at
    column ``index[r, j]`` (a fixed number of entries per row: the ELL sparse layout)."""
    if index is None or index.numel() == 0:
        return w
    return w.scatter(1, index.long(), value.to(w.dtype))


def num_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row: ``ceil(in_features / group_size)``, 1 per channel."""
    return 1 if group_size is None else -(-in_features // group_size)


def grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape ``[out, in]`` to ``[out, G, g]`` (zero-padded) and return it with a validity mask."""
    out, n = w.shape
    g = n if group_size is None else group_size
    groups = -(-n // g)
    pad = groups * g - n
    mask = torch.ones(n, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return w.reshape(out, groups, g), mask.reshape(1, groups, g)


def masked_range(wg: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``[..., G, 1]`` min and max over the valid (mask) entries; 0 for empty groups.
    ``mask=None`` counts every entry."""
    if mask is None:
        return wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    big = torch.finfo(torch.float32).max
    wmin = torch.where(mask, wg, big).amin(-1, keepdim=True)
    wmax = torch.where(mask, wg, -big).amax(-1, keepdim=True)
    empty = wmin > wmax
    return torch.where(empty, 0.0, wmin), torch.where(empty, 0.0, wmax)


def integer_zero(minimum: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer zero point ``clamp(round(-minimum / scale), 0, 2**bits - 1)`` (float32 values) nearest
    to a float minimum, for stored (rounded) scales."""
    return torch.clamp(torch.round(-minimum / scale), 0, 2**bits - 1)


def snap_minimum(minimum: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 minimum ``-zero * scale`` of the integer zero point nearest to ``minimum``."""
    return -(integer_zero(minimum, scale, bits) * scale)


def group_params(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    bits: int,
    symmetric: bool,
    dtype: torch.dtype,
    zero_point: str = "float",
):
    """Stored (rounded) scale and minimum for given group ranges ``[..., G, 1]``. With
    ``zero_point="integer"`` the range is widened to include 0 and the minimum is ``-zero * scale``
    (float32) for the integer zero point ``zero = clamp(round(-wmin / scale), 0, 2**bits - 1)``."""
    integer = not symmetric and zero_point == "integer"
    if integer:
        wmin, wmax = torch.clamp(wmin, max=0.0), torch.clamp(wmax, min=0.0)
    if symmetric:
        amax = torch.maximum(wmax.abs(), wmin.abs())
        scale = amax / (2 ** (bits - 1) - 1)
        minimum = None
    else:
        scale = (wmax - wmin) / (2**bits - 1)
        minimum = wmin.to(dtype).float()
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24
    scale = torch.where(scale > tiny, scale, torch.full_like(scale, 1.0))  # constant group
    scale = scale.to(dtype).float()
    if integer:
        minimum = snap_minimum(wmin, scale, bits)
    return scale, minimum


def round_codes(wg: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Float codes of ``wg`` on the grid of ``scale`` and ``minimum`` (symmetric when ``minimum`` is None)."""
    if minimum is None:
        half = 2 ** (bits - 1)
        return torch.clamp(torch.round(wg / scale), -half, half - 1) + half
    return torch.clamp(torch.round((wg - minimum) / scale), 0, 2**bits - 1)


def reconstruct(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The float weights that ``codes`` stand for (the inverse of :func:`round_codes` on the grid)."""
    if minimum is None:
        return (codes - 2 ** (bits - 1)) * scale
    return codes * scale + minimum


def fit_group_params(
    wg: torch.Tensor,
    valid: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    clip: str = "none",
    clip_grid: int = 20,
    clip_max_shrink: float = 0.5,
    zero_point: str = "float",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored (rounded) scale and minimum ``[out, G, 1]`` of grouped weights ``wg [out, G, g]``:
    each group's range over its ``valid`` entries (bool, broadcastable to ``wg``; padding of a
    partial last group and excluded weights are False; ``None``: all count), optionally shrunk by the clip search.
    With ``zero_point="integer"`` the minimum is ``-zero * scale`` for an integer zero point (see `group_params`).

    The clip search (``clip="mse"``) tries ``clip_grid`` shrink ratios ``r`` from 1 down to
    ``1 - clip_max_shrink``, rounds each group over ``[r*min, r*max]`` and keeps, per group, the
    ratio with the smallest squared reconstruction error over the valid entries. This is the one
    range and clip search of the package: round-to-nearest and GPTQ's group fits use it.
    """
    wmin, wmax = masked_range(wg, valid)
    scale, minimum = group_params(wmin, wmax, bits, symmetric, scale_dtype, zero_point)
    if clip == "mse":
        best_err = torch.full_like(wmin, float("inf"))
        for r in torch.linspace(1.0, 1.0 - clip_max_shrink, clip_grid).tolist():
            s, m = group_params(wmin * r, wmax * r, bits, symmetric, scale_dtype, zero_point)
            sq = (reconstruct(round_codes(wg, s, m, bits), s, m, bits) - wg) ** 2
            err = (sq if valid is None else sq * valid).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s, scale)
            if m is not None:
                minimum = torch.where(better, m, minimum)
    return scale, minimum


def pack_groups(
    wg: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
    scale_dtype: torch.dtype,
    zero_point: str = "float",
) -> QuantizedWeight:
    """Round grouped weights ``wg [out, G, g]`` on the grid of ``scale``/``minimum [out, G, 1]`` and
    pack the codes (the padding of a partial last group dropped) with the scales in ``scale_dtype``.
    With ``zero_point="integer"`` (asymmetric) the grid's integer zero point ``round(-minimum / scale)``
    (clamped to ``[0, 2**bits - 1]``; exact for minima from `group_params`) is stored as uint8 ``zero``
    instead of the minimum."""
    check_zero_point(zero_point)
    out = wg.shape[0]
    zero = None
    if minimum is not None and zero_point == "integer":
        zero = integer_zero(minimum, scale, bits)
        minimum = -(zero * scale)
    codes = round_codes(wg, scale, minimum, bits).reshape(out, -1)[:, :in_features].to(torch.int64)
    return QuantizedWeight(
        packed=pack(codes, bits),
        scale=scale.squeeze(-1).to(scale_dtype).contiguous(),
        minimum=None if minimum is None or zero is not None else minimum.squeeze(-1).to(scale_dtype).contiguous(),
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        zero=None if zero is None else zero.squeeze(-1).to(torch.uint8).contiguous(),
    )


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip: str = "none",
    clip_grid: int = 20,
    clip_max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.float16,
    exclude: torch.Tensor | None = None,
    zero_point: str = "float",
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight [out, in]``, optionally with a clip search.
    ``zero_point`` (asymmetric only): ``"float"`` stores a float minimum per group, ``"integer"`` an
    integer zero point (see the module docstring).

    The clip search ("mse") tries ``clip_grid`` shrink ratios ``r`` from 1 down to
    ``1 - clip_max_shrink``, quantizes each group over the shrunk range ``[r*min, r*max]`` and keeps,
    per group, the ratio with the smallest squared reconstruction error.

    ``exclude`` (bool ``[out, in]``) marks weights stored exactly elsewhere (outliers): they neither
    widen a group's range nor count in the clip search. The returned codes at those positions
    are valid but unused.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if clip not in ("none", "mse"):
        raise ValueError(f"clip={clip!r} is not allowed; allowed values: none, mse")
    check_zero_point(zero_point)
    w = weight.detach().float()
    out, n = w.shape
    wg, mask = grouped(w, group_size)
    if exclude is not None:
        if exclude.shape != weight.shape:
            raise ValueError(f"exclude has shape {tuple(exclude.shape)}, expected {tuple(weight.shape)}")
        kept, _ = grouped(exclude.to(w.device).float(), group_size)
        mask = mask & (kept == 0)
    scale, minimum = fit_group_params(
        wg, mask, bits, symmetric, scale_dtype, clip, clip_grid, clip_max_shrink, zero_point
    )
    return pack_groups(wg, scale, minimum, bits, group_size, n, scale_dtype, zero_point)


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    zero_point: str = "float",
) -> torch.Tensor:
    """``quantize_weight(...).dequantize()`` without packing (min/max range, no clip search):
    the float32 weight the rounded model would compute with. Used inside searches."""
    codes, scale, minimum = minmax_codes(weight, bits, group_size, symmetric, scale_dtype, zero_point)
    return dequantize_codes(
        codes, scale.squeeze(-1), None if minimum is None else minimum.squeeze(-1), bits, group_size, torch.float32
    )


def minmax_codes(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype,
    zero_point: str = "float",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest on each group's min/max range, unpacked: float codes ``[out, in]`` and the
    stored scale and minimum ``[out, G, 1]`` (the minimum ``None`` when symmetric; ``-zero * scale``
    in float32 for ``zero_point="integer"``, see `integer_zero`)."""
    check_zero_point(zero_point)
    w = weight.detach().float()
    out, n = w.shape
    g = n if group_size is None else group_size
    groups = -(-n // g)
    pad = groups * g - n
    # pad the partial last group by repeating its last column: min/max are unchanged
    wg = (torch.cat([w, w[:, -1:].expand(out, pad)], 1) if pad else w).reshape(out, groups, g)
    scale, minimum = group_params(
        wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True), bits, symmetric, scale_dtype, zero_point
    )
    return round_codes(wg, scale, minimum, bits).reshape(out, groups * g)[:, :n], scale, minimum


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float weight ``[out, in]`` from unpacked codes and per-group scale/minimum ``[out, G]``, or, with
    ``zero`` (integer zero points ``[out, G]``, ``minimum`` None), ``(u - zero) * scale``: computed in
    float32 as ``u * scale + (-zero * scale)`` (the same number for 16-bit scales, and the fused CPU
    kernel's operations), in other dtypes as ``(u - zero) * scale`` (one rounding)."""
    out, n = codes.shape
    g = n if group_size is None else group_size
    groups = scale.shape[-1]
    c = codes.to(dtype)
    pad = groups * g - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(out, groups, g)
    s = scale.to(dtype).unsqueeze(-1)
    if zero is not None:
        z = zero.to(dtype).unsqueeze(-1)
        w = c * s + (-(z * s)) if dtype == torch.float32 else (c - z) * s
    elif minimum is None:
        w = (c - 2 ** (bits - 1)) * s
    else:
        w = c * s + minimum.to(dtype).unsqueeze(-1)
    return w.reshape(out, groups * g)[:, :n]
