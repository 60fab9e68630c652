"""GPTQ: Hessian-aware rounding of one weight matrix into the group-wise format of ``scheme``.

Layer-wise objective ``min ||X W^T - X W_hat^T||^2`` with ``H ~ X^T X``. Columns are quantized
one at a time in a fixed order shared by all rows; after each column its rounding error is
propagated into the not-yet-quantized columns through the upper Cholesky factor ``U`` of
``H^-1`` (``H^-1 = U^T U``). Updates inside a block of ``block_size`` columns are applied
eagerly, the rest lazily once per block (one matmul).

Group parameters (scale, minimum) follow :mod:`hf_efficiency.quant.core.scheme` exactly: same min/max
fit, same optional MSE shrink search, rounded to ``scale_dtype`` before codes are computed (with
``zero_point="integer"`` the minimum is ``-zero * scale`` for an integer zero point, so the column sweep
rounds on exactly the integer grid that is stored), and
groups of ``group_size`` consecutive columns in the original column order (last group may be
partial). Without act-order a group's parameters are fitted from the current, already
error-updated weights when the sweep reaches its first column (standard GPTQ). With act-order the
columns are swept in descending ``diag(H)`` order, which would scatter groups, so the parameters
of all groups are fitted up front from the (dead-input-zeroed) original weight ("static groups");
the stored format needs no ``g_idx``.

Excluded weights (``exclude``, e.g. SpQR-style outliers kept in fp16 elsewhere) take no part in
fitting group ranges, are "quantized" to their own current value (zero error, so they propagate
nothing), and that value is returned so the caller can store it.

Everything runs in float32 on the weight's device. Pure tensor code: no transformers import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.packing import SUPPORTED_BITS
from ..core.scheme import QuantizedWeight, check_zero_point, fit_group_params, grouped, num_groups, pack_groups
from .base import MethodOptions, QuantMethod, boolean, float_open, option, positive_int

logger = logging.getLogger(__name__)

__all__ = ["gptq_quantize"]

_CLIPS = ("none", "mse")
_MAX_DAMP_RETRIES = 3
_SUB_BLOCK = 32  # columns per eager rank-1 update window
_SERIAL_NUMEL = 16384  # keep eager updates below torch's intra-op parallel grain (32768)


def _inverse_upper_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``H^-1 = U^T U``).

    Computed without forming ``H^-1``: with ``J`` the reversal permutation and
    ``J H J = L L^T``, ``U = J L^-1 J`` (one Cholesky and one triangular solve; faster and far
    less sensitive to CPU contention than cholesky -> cholesky_inverse -> cholesky). Retries with
    10x the damping up to ``_MAX_DAMP_RETRIES`` times, then raises. ``h`` is not modified.
    """
    return _inverse_upper_factor_of([h], damp, lambda: h)


def _inverse_upper_factor_of(
    holder: list[torch.Tensor], damp: float, remake: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`_inverse_upper_factor` of ``holder[0]``, which it takes out of the list (the caller keeps no reference:
    it is released once flipped); a retry rebuilds it with ``remake()``. At most three ``n x n`` matrices are
    alive at once (the flipped Hessian becomes the Cholesky input in place of a copy, the triangular solve
    writes into its right-hand side): at n = 8192 each is 256 MiB, and this is the peak of GPTQ's memory, which
    bounds sequential onloading of large models. The arithmetic is that of the plain formulation, bit for bit."""
    h = holder.pop()
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    idx = torch.arange(n, device=h.device)
    device, dtype = h.device, h.dtype
    flipped = h.flip(0, 1)
    del h
    lam = damp
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        if flipped is None:
            flipped = remake().flip(0, 1)
        hd, flipped = flipped, None  # (a fresh flip: adding to its diagonal leaves the Hessian untouched)
        hd[idx, idx] += lam * mean_diag
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            eye = torch.eye(n, device=device, dtype=dtype).t()  # column-major: the solve runs in place in it
            inverse = torch.linalg.solve_triangular(chol, eye, upper=False, out=eye)
            del chol, eye
            upper = inverse.flip(0, 1)
            del inverse
            if bool(torch.isfinite(torch.diagonal(upper)).all()) and bool(torch.isfinite(upper.sum())):
                return upper
            del upper
        else:
            del chol
        if attempt < _MAX_DAMP_RETRIES:
            new_lam = lam * 10 if lam > 0 else 1e-2
            logger.warning(
                "GPTQ: Cholesky of the dampened Hessian failed with damp=%g; retrying with damp=%g", lam, new_lam
            )
            lam = new_lam
    raise RuntimeError(
        f"GPTQ: the Hessian is not positive definite even with damp={lam:g} "
        f"(started from damp={damp:g}); check the calibration statistics for nan/inf or too few tokens"
    )


def _prepared_hessian(
    hessian: torch.Tensor, device: torch.device, dead: torch.Tensor | None, perm: torch.Tensor | None
) -> torch.Tensor:
    """The float32 Hessian as `gptq_quantize` factors it: dead inputs' diagonal set to 1, columns permuted."""
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    if dead is not None:
        h[dead, dead] = 1.0
    return h if perm is None else h[perm][:, perm]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    *,
    scale_dtype: torch.dtype = torch.float16,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip: str = "none",
    clip_grid: int = 20,
    clip_max_shrink: float = 0.5,
    exclude: torch.Tensor | None = None,
    zero_point: str = "float",
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Quantize ``weight [out, in]`` with GPTQ against ``hessian [in, in]`` (proportional to ``X^T X``).

    Args:
        weight: float weight ``[out, in]`` of any float dtype (not modified).
        hessian: ``[in, in]``, proportional to ``X^T X`` over calibration tokens; its scale does
            not matter (damping is relative to ``mean(diag H)``). Not modified.
        bits: 2, 3, 4 or 8.
        group_size: consecutive input columns per group (last group may be partial), or ``None``
            for one group per row.
        symmetric: absmax scale with implicit zero point, else min/max with a stored minimum.
        scale_dtype: dtype of the stored scale/minimum; codes are computed against the rounded values.
        damp: fraction of ``mean(diag H)`` added to the diagonal (retried x10 up to 3 times if the
            Cholesky factorization fails).
        act_order: sweep columns in descending ``diag(H)`` order with static (up-front) groups.
        block_size: columns per lazy-update block (a speed knob; results agree up to float rounding).
        clip: ``"none"`` (min/max params) or ``"mse"`` (``scheme``'s shrink grid search per group).
        clip_grid, clip_max_shrink: the shrink grid for ``clip="mse"``.
        exclude: optional bool ``[out, in]``; True marks weights kept exactly elsewhere.
        zero_point: asymmetric grids: ``"float"`` (stored minimum) or ``"integer"`` (uint8 zero point).

    Returns:
        ``(QuantizedWeight, kept)``. ``kept`` is ``None`` without ``exclude``; otherwise a float32
        ``[out, in]`` tensor holding, at excluded positions, the error-compensated weight value at
        the time its column was processed (zeros elsewhere). The stored codes at excluded positions
        are valid but meaningless: the caller must overwrite those weights with ``kept``.
    """
    # ---------------------------------------------------------------- validation
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed values: {SUPPORTED_BITS}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"expected a 2-D weight [out, in], got shape {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a float weight, got dtype {weight.dtype}")
    out, n = weight.shape
    if out == 0 or n == 0:
        raise ValueError(f"weight shape {tuple(weight.shape)} is empty")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n, n):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian shape {shape} does not match the weight: expected ({n}, {n})")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size={group_size!r} must be a positive int or None")
    if clip not in _CLIPS:
        raise ValueError(f"clip={clip!r} is not allowed; allowed values: {', '.join(_CLIPS)}")
    check_zero_point(zero_point)
    if clip == "mse" and (int(clip_grid) < 1 or not 0.0 <= clip_max_shrink < 1.0):
        raise ValueError(f"clip_grid={clip_grid!r} must be >= 1 and clip_max_shrink={clip_max_shrink!r} in [0, 1)")
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if not damp >= 0.0:  # also rejects nan
        raise ValueError(f"damp={damp!r} must be >= 0")
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.bool or tuple(exclude.shape) != (out, n):
            desc = (
                f"{tuple(exclude.shape)} {exclude.dtype}"
                if isinstance(exclude, torch.Tensor)
                else type(exclude).__name__
            )
            raise ValueError(f"exclude must be a bool tensor of shape ({out}, {n}), got {desc}")

    device = weight.device
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian contains nan or inf")
    w = weight.detach().to(torch.float32, copy=True)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains nan or inf")

    g = n if group_size is None else group_size
    n_groups = num_groups(n, group_size)
    half = 2 ** (bits - 1)
    maxq = 2**bits - 1

    # ---------------------------------------------------------------- dead inputs
    dead = torch.diagonal(h) == 0  # (no view of h is kept: h must be freed when factored)
    dead_idx = None
    if bool(dead.any()):
        idx = dead_idx = torch.nonzero(dead).squeeze(1)
        h[idx, idx] = 1.0
        w[:, dead] = 0.0

    valid_all = None if exclude is None else ~exclude.to(device)

    # ---------------------------------------------------------------- static groups (act-order)
    static_scale = static_min = None
    if act_order:
        pad = n_groups * g - n
        wg = torch.nn.functional.pad(w, (0, pad)).reshape(out, n_groups, g)
        colmask = torch.ones(n, dtype=torch.bool, device=device)
        if valid_all is None:
            valid = torch.nn.functional.pad(colmask, (0, pad)).reshape(1, n_groups, g) if pad else None
        else:
            valid = torch.nn.functional.pad(valid_all, (0, pad)).reshape(out, n_groups, g)
        static_scale, static_min = fit_group_params(
            wg, valid, bits, symmetric, scale_dtype, clip, clip_grid, clip_max_shrink, zero_point
        )
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h = h[perm][:, perm]
        group_of_col = perm // g
        # per swept column, per row: [n, out]
        col_scale = static_scale.squeeze(-1).t()[group_of_col].contiguous()
        col_min = None if static_min is None else static_min.squeeze(-1).t()[group_of_col].contiguous()
    else:
        perm = None

    holder = [h]
    del h
    upper = _inverse_upper_factor_of(holder, damp, lambda: _prepared_hessian(hessian, device, dead_idx, perm))
    # Row-normalize to a unit diagonal: with raw errors r_j = w_j - q_j the OBS update of a later
    # column k is  w_k -= r_j * U[j, k] / U[j, j]  (GPTQ's err_j = r_j / U_jj folded into U).
    upper.div_(torch.diagonal(upper).clone().unsqueeze(1))

    # Work in the transposed layout: swept column j is the contiguous row wt[j] of length `out`.
    # Row wt[j] is never touched again once column j is processed, so at the end wt holds, for
    # every column, exactly the value that was rounded; codes and kept values are read off it.
    wt = (w if perm is None else w[:, perm]).t().contiguous()
    del w
    ex_t = None
    ex_cols: list[bool] = []
    if exclude is not None:
        ex_t = (exclude.to(device) if perm is None else exclude.to(device)[:, perm]).t().contiguous()
        ex_cols = ex_t.any(1).tolist()

    # Block boundaries; without act-order every group start is a block start, so when a group is
    # fitted all earlier errors have been applied to all of its columns (its weights are current).
    starts = set(range(0, n, block_size))
    if perm is None:
        starts.update(range(0, n, g))
    bounds = sorted(starts) + [n]
    # Eager rank-1 updates stay within sub-blocks of `sub` columns (small enough to run serially
    # in torch's elementwise kernels); sub-blocks are flushed into the rest of the block by a matmul.
    sub = max(1, min(_SUB_BLOCK, _SERIAL_NUMEL // out))

    group_scales: list[torch.Tensor] = []
    group_mins: list[torch.Tensor] = []
    s_cur = m_cur = None
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        cnt = i2 - i1
        if perm is None and i1 % g == 0:
            end = min(i1 + g, n)
            valid = None if ex_t is None else ~ex_t[i1:end].t().unsqueeze(1)
            sc, mn = fit_group_params(
                wt[i1:end].t().unsqueeze(1),
                valid,
                bits,
                symmetric,
                scale_dtype,
                clip,
                clip_grid,
                clip_max_shrink,
                zero_point,
            )
            s_cur = sc.reshape(out)
            m_cur = None if mn is None else mn.reshape(out)
            group_scales.append(s_cur)
            if m_cur is not None:
                group_mins.append(m_cur)
        w1 = wt[i1:i2]  # views: updates land in wt directly
        u1 = upper[i1:i2, i1:i2]
        err1 = torch.empty(cnt, out, device=device, dtype=torch.float32)
        for j1 in range(0, cnt, sub):
            j2 = min(j1 + sub, cnt)
            for i in range(j1, j2):
                col = i1 + i
                if perm is not None:
                    s_cur = col_scale[col]
                    m_cur = None if col_min is None else col_min[col]
                x = w1[i]
                e_i = err1[i]  # becomes q - x (negated error), computed in place
                if m_cur is None:
                    torch.div(x, s_cur, out=e_i).round_().clamp_(-half, half - 1).mul_(s_cur).sub_(x)
                else:
                    torch.sub(x, m_cur, out=e_i).div_(s_cur).round_().clamp_(0, maxq).mul_(s_cur)
                    e_i.add_(m_cur).sub_(x)
                if ex_cols and ex_cols[col]:
                    e_i.masked_fill_(ex_t[col], 0.0)  # kept exactly: no error to propagate
                if i + 1 < j2:
                    w1[i + 1 : j2].addr_(u1[i, i + 1 : j2], e_i)
            if j2 < cnt:
                w1[j2:].addmm_(u1[j1:j2, j2:].t(), err1[j1:j2])
        if i2 < n:
            wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1)

    # ---------------------------------------------------------------- assemble
    final = wt.t()  # [out, n], swept order: the value each weight had when it was rounded
    if perm is not None:
        final = final[:, torch.argsort(perm)]
        scale = static_scale
        minimum = static_min
    else:
        scale = torch.stack(group_scales, 1).unsqueeze(-1)
        minimum = torch.stack(group_mins, 1).unsqueeze(-1) if group_mins else None
    kept = None if exclude is None else torch.where(exclude.to(device), final, 0.0)
    qw = pack_groups(grouped(final, group_size)[0], scale, minimum, bits, group_size, n, scale_dtype, zero_point)
    return qw, (None if kept is None else kept.contiguous())


@dataclass
class GPTQOptions(MethodOptions):
    """Options of ``gptq`` (``quantization={"method": "gptq", "gptq": {...}}``)."""

    damp: float = option(0.01, "dampening, as a fraction of the mean Hessian diagonal", float_open(0, 1))
    act_order: bool = option(
        False,
        "process columns by decreasing Hessian diagonal (group parameters are fitted up front, so groups stay "
        "contiguous on disk)",
        boolean(),
    )
    block_size: int = option(128, "columns per lazy batch update", positive_int())


class GPTQ(QuantMethod):
    name = "gptq"
    summary = "Hessian-based rounding with error compensation, layer by layer on calibration data"
    options = GPTQOptions
    calibrated = True
    needs_hessian = True
    supports_int8_activations = True

    def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
        if hessian is None:
            raise ValueError(
                "gptq needs the input Hessian (X^T X) of every quantized linear: run it with calibration data"
            )
        return gptq_quantize(
            weight,
            hessian,
            fmt.bits,
            fmt.group_size,
            fmt.symmetric,
            scale_dtype=fmt.scale_dtype,
            damp=options.damp,
            act_order=options.act_order,
            block_size=options.block_size,
            clip=fmt.clip,
            clip_grid=fmt.clip_grid,
            clip_max_shrink=fmt.clip_max_shrink,
            exclude=exclude,
            zero_point=fmt.zero_point,
        )

    def describe(self, options: MethodOptions, clip: str) -> str:
        order = ", activation order" if options.act_order else ""
        return f"Hessian-based rounding with error compensation (`gptq`{order})"


METHOD = GPTQ()
