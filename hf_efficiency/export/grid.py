"""A `QuantLinear` seen as the integer grid an engine format stores (pure tensor functions).

Every format engines serve stores a quantized linear as unsigned integer codes ``u`` per weight and,
per group of input features, a scale ``s`` and either an integer zero point ``z`` (GPTQ, AWQ,
compressed-tensors: ``w = (u - z) * s``), an implicit one (symmetric: ``z = 2**(bits-1)``) or a float
minimum ``m`` (GGUF Q4_1/Q5_1: ``w = u * s + m``). :func:`module_grid` expresses one of our modules
on the grid a target can hold, given as a `GridTarget`:

* **exactly** when it can (same codes; a narrower width widened, which is exact; scales that the
  target's scale dtype holds exactly; a float minimum that is a whole number of steps, i.e. an
  integer zero point in disguise; groups the target can express, possibly by repeating a group's
  scale over several of the target's smaller blocks);
* otherwise, with ``lossy=True``, by re-rounding our de-quantized weight onto the nearest grid the
  target holds, and measuring the change (`Grid.change`);
* otherwise raising `ExportError` naming the module and every reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..quant.core.packing import unpack
from ..quant.core.scheme import grouped, quantize_weight, unpermute_columns
from ..quant.core.scheme import num_groups as _num_groups


class ExportError(ValueError):
    """An export cannot hold a module's weights exactly and the user asked for no conversion (``lossy=False``),
    or the model cannot be written in the format at all. The message names the module and the reason."""


@dataclass(frozen=True)
class GridTarget:
    """What one format (or one of its layouts) can store for a linear.

    ``bits``: widths it stores (a narrower width is widened exactly to the smallest one that fits).
    ``zero``: ``"integer"`` (an integer zero point, or symmetric), ``"float"`` (a float minimum in
    ``scale_dtype``, or symmetric) or ``"symmetric"`` (symmetric grids only).
    ``group_sizes``: ``None`` any group size (and per channel); else a tuple of allowed sizes where
    ``-1`` stands for per channel. ``block``: when set, the target stores groups of exactly ``block``
    weights (GGUF's 32): a group of ``k * block`` is written with its scale repeated ``k`` times, and
    per channel is allowed when ``block`` divides the row.
    ``act_order``: whether a column permutation (GPTQ ``g_idx``) can be stored.
    ``int8_activations``: whether modules with int8 activations (W8A8) keep them in the format.
    """

    name: str
    bits: tuple[int, ...]
    zero: str = "integer"
    scale_dtype: torch.dtype = torch.float16
    group_sizes: tuple[int, ...] | None = None
    block: int | None = None
    act_order: bool = True
    int8_activations: bool = False
    symmetric_only_bits: tuple[int, ...] = ()  # widths stored symmetric only (e.g. GGUF's Q8_0)


@dataclass
class Grid:
    """One linear on an integer grid: ``w[o, perm[j]] = (codes[o, j] - zero[o, g]) * scale[o, g]``
    (``zero`` ``None``: ``2**(bits-1)``; with ``minimum``: ``codes[o, j] * scale[o, g] + minimum[o, g]``)
    for stored column ``j`` in group ``g = j // group_size``."""

    name: str
    codes: torch.Tensor  # uint8 [out, in], stored column order
    scale: torch.Tensor  # float32 [out, G], every value exact in the target's scale dtype
    zero: torch.Tensor | None  # int32 [out, G] in [0, 2**bits - 1]; None: symmetric or float minimum
    minimum: torch.Tensor | None  # float32 [out, G] (float-minimum targets only), exact in the scale dtype
    bits: int
    group_size: int | None
    perm: torch.Tensor | None  # int64 [in]: stored column j holds input feature perm[j]
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    source_bits: int  # the module's own width
    symmetric: bool
    act_mode: str | None = None  # "dynamic" / "static" int8 activations (W8A8), kept only where the target can
    input_scale: torch.Tensor | None = None
    change: float = 0.0  # largest |w_exported - w_ours| / max |w_ours| (0.0: exact)
    rms_change: float = 0.0  # ||w_exported - w_ours|| / ||w_ours||
    reasons: list[str] = field(default_factory=list)  # why it was converted (empty: exact)

    @property
    def exact(self) -> bool:
        return not self.reasons

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def signed_zero(self) -> torch.Tensor:
        """Zero points ``[out, G]`` as int32 (``2**(bits-1)`` everywhere when symmetric)."""
        if self.zero is not None:
            return self.zero
        if self.minimum is not None:
            raise ValueError(f"{self.name}: a float-minimum grid has no integer zero point")
        return torch.full_like(self.scale, 2 ** (self.bits - 1), dtype=torch.int32)

    def g_idx(self) -> torch.Tensor:
        """int32 ``[in]``: the group of each input feature (GPTQ's ``g_idx``; act-order aware)."""
        size = self.in_features if self.group_size is None else self.group_size
        stored_group = torch.arange(self.in_features, dtype=torch.int32) // size
        if self.perm is None:
            return stored_group
        return torch.empty_like(stored_group).index_copy_(0, self.perm, stored_group)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]`` in input-feature order: what an engine computes with (exactly, in float32)."""
        return unpermute_columns(_grid_weight(self.codes, self.scale, self.zero, self.minimum, self), self.perm)


def _expand(t: torch.Tensor, group_size: int | None, n: int) -> torch.Tensor:
    """``[out, G]`` per-group values -> ``[out, n]`` per column."""
    size = n if group_size is None else group_size
    return t.repeat_interleave(size, dim=1)[:, :n]


def _grid_weight(codes, scale, zero, minimum, grid) -> torch.Tensor:
    n = codes.shape[1]
    c = codes.float()
    s = _expand(scale.float(), grid.group_size, n)
    if minimum is not None:
        return c * s + _expand(minimum.float(), grid.group_size, n)
    z = 2 ** (grid.bits - 1) if zero is None else _expand(zero.float(), grid.group_size, n)
    return (c - z) * s


def _exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).float(), t.float()))


def module_grid(name: str, module, target: GridTarget, *, lossy: bool = False) -> Grid:
    """``module`` (a `QuantLinear`) on ``target``'s grid; see the module docstring. Raises `ExportError`
    naming ``name`` and the reasons when the grid is not exact and ``lossy`` is False."""
    bits = module.bits
    n, out = module.in_features, module.out_features
    codes = unpack(module.weight.detach().cpu(), bits, n)  # uint8 [out, in], stored order
    scale = module.weight_scale.detach().cpu().float()
    perm = None if module.weight_perm is None else module.weight_perm.detach().cpu().long()
    bias = None if module.bias is None else module.bias.detach().cpu()
    act_mode = getattr(module, "act_mode", None)
    input_scale = getattr(module, "input_scale", None)
    weight_zero = getattr(module, "weight_zero", None)
    weight_min = module.weight_min

    reasons: list[str] = []
    fits = [b for b in target.bits if b >= bits]
    tbits = min(fits) if fits else max(target.bits)
    if not fits:
        reasons.append(f"{bits}-bit codes do not fit the {target.name} widths {list(target.bits)}")
    symmetric = weight_min is None and weight_zero is None
    zero = minimum = None
    if symmetric:
        codes = (
            codes if tbits == bits else (codes.to(torch.int16) + (2 ** (tbits - 1) - 2 ** (bits - 1))).to(torch.uint8)
        )
    elif weight_zero is not None:
        zero = weight_zero.detach().cpu().to(torch.int32)
        if target.zero == "float":
            minimum = -(zero.float() * scale)
            zero = None
            if not _exact_in(minimum, target.scale_dtype):
                reasons.append(f"its integer zero points times the scales are not exact {_dtype_name(target)} minima")
    else:
        minimum = weight_min.detach().cpu().float()
        if target.zero == "integer":
            z = -minimum / scale
            zr = torch.round(z)
            if not (torch.equal(zr * scale, -minimum) and bool(((zr >= 0) & (zr <= 2**bits - 1)).all())):
                reasons.append(
                    "its float minima are not whole steps of the scale (an integer zero point cannot hold them; "
                    "quantize with zero_point='integer' for an exact export)"
                )
            zero = zr.clamp(0, 2**tbits - 1).to(torch.int32)
            minimum = None
        elif not _exact_in(minimum, target.scale_dtype):
            reasons.append(f"its minima are not exact in {_dtype_name(target)}")
    if not symmetric and target.zero == "symmetric":
        reasons.append(f"it is asymmetric and {target.name} stores symmetric grids only")
    if not symmetric and tbits in target.symmetric_only_bits:
        reasons.append(f"it is asymmetric and {target.name} stores {tbits}-bit weights symmetric only")
    if not _exact_in(scale, target.scale_dtype):
        reasons.append(f"its scales ({module.weight_scale.dtype}) are not exact in {_dtype_name(target)}")
    group_ok = _group_allowed(module.group_size, n, target)
    if not group_ok:
        reasons.append(f"group size {module.group_size or 'per channel'} is not one {target.name} stores")
    if perm is not None and not target.act_order:
        reasons.append(f"{target.name} cannot store an act-order column permutation")
    if getattr(module, "outliers", 0):
        reasons.append(f"it keeps {module.outliers} outlier weights per row exactly, which {target.name} cannot hold")
    if act_mode is not None and not target.int8_activations:
        reasons.append(
            f"it quantizes its activations to int8 ({act_mode}), which a weight-only {target.name} export drops"
        )

    grid = Grid(
        name=name,
        codes=codes,
        scale=scale,
        zero=zero,
        minimum=minimum,
        bits=tbits,
        group_size=module.group_size,
        perm=perm,
        bias=bias,
        in_features=n,
        out_features=out,
        source_bits=bits,
        symmetric=symmetric,
        act_mode=act_mode if target.int8_activations else None,
        input_scale=None if input_scale is None or not target.int8_activations else input_scale.detach().cpu(),
    )
    if not reasons:
        return grid
    if not lossy:
        raise ExportError(
            f"{name}: cannot be written to {target.name} exactly: {'; '.join(reasons)}. Pass lossy=True "
            "(--lossy) to convert it to the nearest grid the format holds, with the change measured and reported"
        )
    return _converted(grid, module, target, reasons, group_ok)


def _dtype_name(target: GridTarget) -> str:
    return str(target.scale_dtype).replace("torch.", "")


def _group_allowed(group_size: int | None, n: int, target: GridTarget) -> bool:
    if target.block is not None:
        if group_size is None:
            return n % target.block == 0
        return group_size % target.block == 0 and n % target.block == 0
    if target.group_sizes is None:
        return True
    return (-1 if group_size is None else group_size) in target.group_sizes


def _converted(grid: Grid, module, target: GridTarget, reasons: list[str], group_ok: bool) -> Grid:
    """``grid`` re-rounded onto what ``target`` holds, with the change measured against ``module``'s weight."""
    reference = module.dequantize_weight(torch.float32).detach().cpu()  # input order, outliers included
    tbits = grid.bits if grid.bits in target.bits else max(b for b in target.bits)
    symmetric = target.zero == "symmetric" or tbits in target.symmetric_only_bits or grid.symmetric
    group_size = grid.group_size if group_ok else _nearest_group(grid.group_size, grid.in_features, target)
    keep_perm = grid.perm is not None and target.act_order and group_size == grid.group_size
    w = reference if not keep_perm else reference.index_select(1, grid.perm)  # stored order
    dtype = target.scale_dtype
    if not symmetric and target.zero == "integer":
        scale, zero = _integer_zero_fit(w, tbits, group_size, dtype)
        codes = _round_integer(w, scale, zero, tbits, group_size)
        minimum = None
        if grid.zero is not None and group_size == grid.group_size and keep_perm == (grid.perm is not None):
            # same groups: keeping each group's scale and rounding its minimum to a whole step may change less
            kept_scale = grid.scale.to(dtype).float()
            kept_codes = _round_integer(w, kept_scale, grid.zero, tbits, group_size)
            fresh = _grid_weight(codes, scale, zero, None, grid) - w
            kept = _grid_weight(kept_codes, kept_scale, grid.zero, None, grid) - w
            better = _per_group_sq(kept, group_size) < _per_group_sq(fresh, group_size)
            scale = torch.where(better, kept_scale, scale)
            zero = torch.where(better, grid.zero, zero)
            codes = _round_integer(w, scale, zero, tbits, group_size)
    else:
        q = quantize_weight(w, tbits, group_size, symmetric, scale_dtype=dtype)
        codes = unpack(q.packed, tbits, grid.in_features)
        scale, zero = q.scale.float(), None
        minimum = None if q.minimum is None else q.minimum.float()
    out = Grid(
        name=grid.name,
        codes=codes,
        scale=scale,
        zero=zero,
        minimum=minimum,
        bits=tbits,
        group_size=group_size,
        perm=grid.perm if keep_perm else None,
        bias=grid.bias,
        in_features=grid.in_features,
        out_features=grid.out_features,
        source_bits=grid.source_bits,
        symmetric=symmetric,
        act_mode=grid.act_mode,
        input_scale=grid.input_scale,
        reasons=list(reasons),
    )
    exported = out.dequantize()
    diff = exported - reference
    out.change = float(diff.abs().max() / reference.abs().max().clamp_min(1e-30))
    out.rms_change = float(diff.norm() / reference.norm().clamp_min(1e-30))
    return out


def _per_group_sq(d: torch.Tensor, group_size: int | None) -> torch.Tensor:
    dg, _ = grouped(d, group_size)
    return (dg * dg).sum(-1)


def _nearest_group(group_size: int | None, n: int, target: GridTarget) -> int | None:
    """The allowed group size closest to (and not larger than, where possible) ``group_size``."""
    if target.block is not None:
        if group_size is not None and group_size >= target.block:
            return group_size // target.block * target.block
        return target.block
    allowed = [g for g in (target.group_sizes or ()) if g != -1]
    if group_size is None and -1 in (target.group_sizes or ()):
        return None
    if not allowed:
        return None
    want = n if group_size is None else group_size
    smaller = [g for g in allowed if g <= want]
    return max(smaller) if smaller else min(allowed)


def _integer_zero_fit(w: torch.Tensor, bits: int, group_size: int | None, dtype: torch.dtype):
    """Min/max scale (stored in ``dtype``) and integer zero point per group ``[out, G]``."""
    wg, mask = grouped(w.float(), group_size)
    big = torch.finfo(torch.float32).max
    wmin = torch.where(mask, wg, big).amin(-1).clamp(max=0.0)
    wmax = torch.where(mask, wg, -big).amax(-1).clamp(min=0.0)
    scale = ((wmax - wmin) / (2**bits - 1)).to(dtype).float()
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
    zero = torch.round(-wmin / scale).clamp(0, 2**bits - 1).to(torch.int32)
    return scale, zero


def _round_integer(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None):
    n = w.shape[1]
    s = _expand(scale, group_size, n)
    z = _expand(zero.float(), group_size, n)
    return torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1).to(torch.uint8)


def whole_group_size(group_size: int | None, n: int, min_block: int = 16) -> int | None:
    """The group size a row of ``n`` weights can be written with when a format needs groups that divide the
    row (compressed-tensors, and vLLM's GPTQ/AWQ kernels): ``None`` (per channel) for per channel or one group
    covering the row; ``group_size`` when it divides ``n``; else the largest size dividing both when it is at
    least ``min_block`` (each scale then repeated over its blocks with `regroup`, which is exact); ``0`` when
    there is none."""
    if group_size is None:
        return None
    if n % group_size == 0:
        return group_size
    if group_size > n:
        return None
    block = math.gcd(group_size, n)
    return block if block >= min_block else 0


def whole_groups(modules: dict) -> dict[str, int | None]:
    """Per module (name -> `QuantLinear`), the group size to write it with when a format needs groups that
    divide the row: `whole_group_size` of its own, and for modules sharing a group size, the largest size
    that works for all of them (so they keep sharing one: SmolLM2's g128 becomes g64 for its 576-wide inputs
    and, for one model-wide size, g64 for its 1536-wide ones too). ``0``: no such size for that module."""
    own = {name: whole_group_size(m.group_size, m.in_features) for name, m in modules.items()}
    shared: dict[int, int] = {}
    for name, m in modules.items():
        if m.group_size is not None and own[name]:
            shared[m.group_size] = math.gcd(shared.get(m.group_size, 0), own[name])
    return {
        name: own[name] if m.group_size is None or not own[name] else shared[m.group_size]
        for name, m in modules.items()
    }


def regroup(grid: Grid, block: int | None) -> Grid:
    """``grid`` with groups of ``block`` weights (``None``: per channel), each group's scale, zero point or
    minimum repeated over the blocks it covers: the same weights, exactly. ``block`` must divide the grid's
    group size (or the row, for a per-channel grid)."""
    size = grid.in_features if grid.group_size is None else grid.group_size
    if block is None or block == grid.group_size:
        if block is None and grid.group_size is not None and grid.groups != 1:
            raise ValueError(f"{grid.name}: a grid of {grid.groups} groups cannot be written per channel")
        return grid if block == grid.group_size else dataclasses.replace(grid, group_size=None)
    if size % block or (grid.group_size is None and grid.in_features % block):
        raise ValueError(f"{grid.name}: blocks of {block} do not tile groups of {size}")
    index = torch.arange(-(-grid.in_features // block)) * block // size

    def pick(t):
        return None if t is None else t[:, index].contiguous()

    return dataclasses.replace(
        grid, scale=pick(grid.scale), zero=pick(grid.zero), minimum=pick(grid.minimum), group_size=block
    )


def num_groups(grid: Grid) -> int:
    """Groups per row of ``grid``."""
    return _num_groups(grid.in_features, grid.group_size)
