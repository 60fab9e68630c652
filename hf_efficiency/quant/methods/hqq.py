"""HQQ: calibration-free half-quadratic optimization of the zero point (and scale) of each group.

Method (mobiusml/hqq ``optimize_weights_proximal``). For each group the quantizer
``Q(W) = clamp(round((W - minimum) / scale), 0, 2**b - 1)`` with reconstruction
``W_r = Q(W) * scale + minimum`` is fitted to minimize the hyper-Laplacian loss
``||W - W_r||_p^p`` (``p = 0.7``), which tolerates outliers. Half-quadratic splitting adds an
auxiliary ``W_e ~ W - W_r`` and alternates, starting from the min/max (round-to-nearest) fit:

1. codes ``u = Q(W)`` and residual ``r = W - W_r`` for the current ``(scale, minimum)``;
2. ``W_e = shrink_p(r, beta) = sign(r) * relu(|r| - |r|**(p-1) / beta)`` (generalized soft
   thresholding, the proximal step of the lp term);
3. closed-form least squares of ``u * scale + minimum ~ W - W_e`` with the codes fixed: over
   ``minimum`` alone (HQQ's zero step, ``optimize_scale=False``) or jointly over ``scale`` and
   ``minimum`` (``optimize_scale=True``; the scale step is over-relaxed by 1.5, which still
   decreases that quadratic, and a step that would make the scale non-positive is skipped);
4. ``beta *= kappa``; every iterate is evaluated by its mean ``|W - W_r|`` per group and the best
   one is kept; the loop stops early when no group improves.

The joint scale step lowers the mean absolute weight error well below the zero-only variant at
2-4 bits (heavy-tailed random weights and SmolLM2-135M weights), but it does so by shrinking the
range, and on SmolLM2-135M that raises perplexity (3-bit g64, 8 evaluation windows: RTN 206,
zero-only 161, joint 256; benchmarks/hqq_and_mixed_screen.py): the largest weights matter most. So the default is HQQ's own
zero-point-only optimization (``optimize_scale=False``). Since the starting point is the
min/max fit and the best iterate is kept, each group's mean absolute error is not above
round-to-nearest min/max (up to float ties in the rounding).

As in HQQ, the shrinkage is not scale invariant: ``shrink_p`` is zero exactly where
``|r| <= beta**(-1 / (2 - p))`` (about 0.17 for ``beta0 = 10``, ``p = 0.7``), so for typical LLM
weights the lp term only acts on rare large residuals and the updates are essentially least
squares. The code uses this: ``W - W_e = W_r + d`` with ``d = r`` except on those rare weights,
which are fixed up sparsely (no ``pow`` over the whole matrix).

Parametrization. HQQ stores an inverse scale ``s`` and a zero ``z`` with
``W_r = (W_q - z) / s``; ours is ``W_r = u * scale + minimum``, i.e. ``scale = 1 / s`` and
``minimum = -z * scale`` (HQQ's zero step ``z <- mean(W_q - (W - W_e) * s)`` becomes
``minimum <- mean(W - W_e - u * scale)``). The whole optimization runs directly in our
parametrization, with ``scale`` and ``minimum`` rounded to ``scale_dtype`` at every iterate, so
the codes and the error that selects the best iterate are exactly what gets stored.

Integer zero points (``zero_point="integer"``). HQQ's zero step moves the grid by a fraction of a step,
which an integer zero point cannot hold, and rounding the zero inside the update would undo almost every
such move (the mean residual is far below half a step) and stall the loop at the start. So the
half-quadratic iterates run exactly as above (float minimum, the ``float`` trajectory); each iterate is
snapped to its nearest integer zero point (``minimum -> -clamp(round(-minimum / scale)) * scale``), its
mean ``|W - W_r|`` is measured on that integer grid, and the best *snapped* iterate is kept (the loop
stops when neither the float nor the snapped error improves). The start is the integer round-to-nearest
grid (range including 0), so the result is never worse than it on that measure; with the zero-only
default the gain over it is small (a group only moves when its float zero drifts past half a step),
the scale step (``optimize_scale``) has more room.

All groups are processed at once as ``[out, G, g]``; the padded tail of a partial last group and
``exclude``-d weights (outliers kept exactly elsewhere) carry zero weight everywhere: they widen
no range and count in no mean. Excluded weights still get their nearest (clamped) code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.packing import SUPPORTED_BITS
from ..core.scheme import QuantizedWeight, check_zero_point, group_params, grouped, pack_groups, snap_minimum
from .base import MethodOptions, QuantMethod, boolean, int_in, option

# Over-relaxation of the scale step: a step of 1.5x the least-squares scale correction (the minimum
# is then the exact least-squares one for that scale). Any factor in (0, 2) still decreases the
# fixed-code quadratic; 1.5 speeds up the slow Lloyd-like convergence and, on SmolLM2-135M weights,
# lowers both the mean absolute and the mean squared error at 2-4 bits versus 1.0.
_SCALE_STEP = 1.5


def _stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).float()


def hqq_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    scale_dtype: torch.dtype = torch.float16,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool = False,
    exclude: torch.Tensor | None = None,
    zero_point: str = "float",
) -> QuantizedWeight:
    """Asymmetric group-wise quantization of ``weight [out, in]`` with HQQ-optimized parameters.

    Args:
        weight: float weight ``[out, in]`` (any float dtype; computed in float32).
        bits: 2, 3, 4 or 8.
        group_size: consecutive input columns per group (last group may be partial); ``None``
            means one group per row.
        scale_dtype: dtype in which ``scale`` and ``minimum`` are stored.
        iters: maximum number of half-quadratic updates (0 gives min/max round-to-nearest).
        lp_norm: ``p`` of the lp loss (``0 < p <= 1``; 1 is plain soft thresholding).
        beta: initial penalty ``beta0`` of the splitting; multiplied by ``kappa`` each iteration.
        kappa: growth factor of ``beta``.
        optimize_scale: also update the scale (joint least squares); ``False`` is HQQ's
            zero-point-only optimization.
        exclude: optional bool ``[out, in]``; ``True`` marks weights represented exactly
            elsewhere (outliers), which are ignored when fitting the groups.
        zero_point: ``"float"`` (a float minimum per group) or ``"integer"`` (an integer zero point,
            see the module docstring).

    Returns:
        ``QuantizedWeight`` with ``minimum`` set (asymmetric form ``u * scale + minimum``), or with
        ``zero`` set for ``zero_point="integer"`` (``(u - zero) * scale``).
    """
    check_zero_point(zero_point)
    integer = zero_point == "integer"
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed values: {SUPPORTED_BITS}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got dtype {weight.dtype}")
    out, n = weight.shape
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be a positive int or None")
    if iters < 0:
        raise ValueError(f"iters={iters} must be >= 0")
    if not 0 < lp_norm <= 1:
        raise ValueError(f"lp_norm={lp_norm} must be in (0, 1]")
    if beta <= 0 or kappa <= 0:
        raise ValueError(f"beta={beta} and kappa={kappa} must be positive")
    if exclude is not None:
        if exclude.shape != weight.shape:
            raise ValueError(f"exclude has shape {tuple(exclude.shape)}, expected {tuple(weight.shape)}")
        exclude = exclude.to(device=weight.device, dtype=torch.bool)

    qmax = float(2**bits - 1)
    w = weight.detach().float()
    wg, pad_mask = grouped(w, group_size)  # [out, G, g], [1, G, g]
    g = wg.shape[-1]
    valid = pad_mask.expand_as(wg)
    if exclude is not None:
        valid = valid & ~grouped(exclude, group_size)[0]
    masked = not bool(valid.all())
    m = valid.float() if masked else None
    if masked:
        wg = wg * m  # excluded and padded weights -> 0: finite, and weighted by 0 below
        count = m.sum(-1, keepdim=True)
    else:
        count = torch.full(wg.shape[:-1] + (1,), float(g), device=wg.device)
    inv_count = 1.0 / count.clamp_min(1.0)

    big = torch.finfo(torch.float32).max
    if masked:
        wmin = torch.where(valid, wg, big).amin(-1, keepdim=True)
        wmax = torch.where(valid, wg, -big).amax(-1, keepdim=True)
        empty = count == 0
        wmin = torch.where(empty, 0.0, wmin)
        wmax = torch.where(empty, 0.0, wmax)
    else:
        wmin = wg.amin(-1, keepdim=True)
        wmax = wg.amax(-1, keepdim=True)
    # min/max start, stored values (integer: the integer round-to-nearest grid, its range including 0)
    scale, minimum = group_params(wmin, wmax, bits, False, scale_dtype, zero_point)
    tiny = torch.finfo(scale_dtype).tiny if scale_dtype != torch.float16 else 2.0**-24

    def snapped_error(scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        """Mean |W - W_r| per group on the grid of ``scale`` and ``minimum`` (already integer-snapped)."""
        inv_s = 1.0 / scale
        x = torch.addcmul(-minimum * inv_s, wg, inv_s)
        r = x.sub_(x.round().clamp(0.0, qmax))
        if m is not None:
            r.mul_(m)
        return r.abs_().sum(-1, keepdim=True).mul_(scale * inv_count)

    best_err = torch.full_like(scale, float("inf"))
    best_float_err = torch.full_like(scale, float("inf"))  # integer: the float trajectory's own best
    best_scale, best_min = scale, minimum
    vecdot = torch.linalg.vecdot
    for it in range(iters + 1):
        # 1. codes and residual of the current stored parameters, in units of the scale:
        #    x = (W - minimum) / scale, u = clamp(round(x)), r / scale = x - u
        inv_s = 1.0 / scale
        x = torch.addcmul(-minimum * inv_s, wg, inv_s)
        u = x.round().clamp_(0.0, qmax)
        rs = x.sub_(u)
        if m is not None:
            u.mul_(m)  # padded/excluded: code 0 and residual 0, so every sum below is masked
            rs.mul_(m)
        a = rs.abs()
        err = a.sum(-1, keepdim=True).mul_(scale * inv_count)  # mean |W - W_r| per group
        if integer:  # keep the best integer-snapped iterate; go on while either error improves
            snapped = snap_minimum(minimum, scale, bits)
            err_int = snapped_error(scale, snapped)
            better = err_int < best_err
            float_better = err < best_float_err
            if not bool(better.any()) and not bool(float_better.any()):
                break
            best_float_err = torch.where(float_better, err, best_float_err)
            best_err = torch.where(better, err_int, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_min = torch.where(better, snapped, best_min)
        else:
            better = err < best_err
            if not bool(better.any()):
                break
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_min = torch.where(better, minimum, best_min)
        if it == iters:
            break
        # 2.-3. W - W_e = W_r + d with d = r - shrink_p(r) = sign(r) * min(|r|, |r|**(p-1) / beta):
        #    d = r where |r| <= c (almost everywhere), so sums of d are sums of r plus a fix-up
        #    computed only in the groups whose largest residual exceeds c.
        sum_d = rs.sum(-1, keepdim=True).mul_(scale)  # sum(r)
        sum_ud = vecdot(u, rs).unsqueeze(-1).mul_(scale) if optimize_scale else None
        c = beta ** (-1.0 / (2.0 - lp_norm))  # |r| <= c  <=>  |r| <= |r|**(p-1) / beta
        hit = (a.amax(-1, keepdim=True) * scale > c).view(-1)
        if bool(hit.any()):  # dense fix-up inside the few groups holding such a residual
            gi = hit.nonzero().squeeze(1)
            rv = rs.reshape(-1, g)[gi] * scale.reshape(-1, 1)[gi]
            av = rv.abs()
            fix = torch.where(av > c, rv.sign() * av.pow(lp_norm - 1.0) / beta - rv, 0.0)  # d - r
            sum_d.view(-1).index_add_(0, gi, fix.sum(1))
            if sum_ud is not None:
                sum_ud.view(-1).index_add_(0, gi, (fix * u.reshape(-1, g)[gi]).sum(1))
        mean_d = sum_d.mul_(inv_count)
        #    least squares of u*scale + minimum ~ W_r + d with the codes fixed
        if optimize_scale:
            mean_u = u.sum(-1, keepdim=True).mul_(inv_count)
            var_u = vecdot(u, u).unsqueeze(-1).mul_(inv_count) - mean_u * mean_u
            cov_ud = sum_ud.mul_(inv_count) - mean_u * mean_d
            ok = var_u > 1e-6
            delta = torch.where(ok, cov_ud / torch.where(ok, var_u, 1.0), 0.0) * _SCALE_STEP
            new_scale = scale + delta
            keep = ~((new_scale > tiny) & torch.isfinite(new_scale))
            delta = torch.where(keep, 0.0, delta)
            new_min = minimum + mean_d - delta * mean_u
            scale = _stored(torch.where(keep, scale, new_scale), scale_dtype)
        else:
            new_min = minimum + mean_d
        minimum = _stored(new_min, scale_dtype)
        beta *= kappa

    wg_orig = grouped(w, group_size)[0] if exclude is not None else wg  # excluded: nearest code
    return pack_groups(wg_orig, best_scale, best_min, bits, group_size, n, scale_dtype, zero_point)


@dataclass
class HQQOptions(MethodOptions):
    """Options of ``hqq`` (``quantization={"method": "hqq", "hqq": {...}}``)."""

    iters: int = option(20, "half-quadratic iterations", int_in(1, 1000))
    optimize_scale: bool = option(
        False,
        "also update each group's scale by least squares (lowers the weight error; measured on SmolLM2 it raises "
        "perplexity, so HQQ's own zero-point-only optimization is the default)",
        boolean(),
    )


class HalfQuadratic(QuantMethod):
    name = "hqq"
    summary = "half-quadratic optimization of every group's zero point (and optionally scale); no data needed"
    options = HQQOptions
    symmetric_allowed = False

    def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
        q = hqq_quantize(
            weight,
            fmt.bits,
            fmt.group_size,
            scale_dtype=fmt.scale_dtype,
            iters=options.iters,
            optimize_scale=options.optimize_scale,
            exclude=exclude,
            zero_point=fmt.zero_point,
        )
        return q, None

    def describe(self, options: MethodOptions, clip: str) -> str:
        return "half-quadratic (`hqq`) optimization of every group's scale and zero point (no calibration data)"


METHOD = HalfQuadratic()
