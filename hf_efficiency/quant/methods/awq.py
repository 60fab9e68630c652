"""AWQ and SmoothQuant scale math (pure tensor functions; the pipeline folds the scales).

Both rescale the input channels of the linears that read one tensor ``X``:
``Y = X W^T = (X / s) (W * s)^T``. Dividing the producer of ``X`` (a norm's weight, or the rows of
the previous linear) by ``s`` and multiplying the consumers' columns by ``s`` keeps the float
model exactly equivalent; only the rounding changes.

* AWQ (mit-han-lab/llm-awq): ``s = mean|X|^alpha`` normalized, ``alpha`` searched on a grid to
  minimize the output error of the quantized consumers, then an output-aware clip search per
  group.
* SmoothQuant: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` for a given migration strength.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .base import LayerContext, MethodOptions, QuantMethod, boolean, int_in, option
from .rtn import round_to_nearest

FakeQuant = Callable[[torch.Tensor], torch.Tensor]

#: token rows used by AWQ's scale search and clip search (a fixed random subsample)
AWQ_SCALE_ROWS = 1024
AWQ_CLIP_ROWS = 512


def _normalized_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def awq_search_scale(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    fake_quants: list[FakeQuant],
    mean_abs: torch.Tensor,
    grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """Per-input-channel scales ``s [in]`` for the linears ``weights`` that all read ``x [n, in]``.

    Tries ``alpha in {0, 1/grid, ..., (grid-1)/grid}``; ``alpha = 0`` is plain rounding, so the
    chosen scales never do worse than no scaling on this objective:
    ``sum_i ||x W_i^T - (x / s) Q_i(W_i * s)^T||^2``. Returns ``(s, alpha, losses)``.
    """
    x = x.float()
    refs = [x @ w.float().t() for w in weights]
    best = (float("inf"), 0.0, torch.ones_like(mean_abs, dtype=torch.float32))
    losses = []
    for i in range(grid):
        alpha = i / grid
        s = _normalized_scales(mean_abs, alpha)
        xs = x / s
        loss = 0.0
        for w, fq, ref in zip(weights, fake_quants, refs):
            loss += (xs @ fq(w.float() * s).t() - ref).pow(2).mean().item()
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


def awq_search_clip(
    x: torch.Tensor,
    weight: torch.Tensor,
    fake_quant: FakeQuant,
    group_size: int | None,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """AWQ's output-aware clip: per (row, group), the bound ``max_val = r * max|w|`` with
    ``r in {1, 1 - 1/grid, ...} >= 1 - max_shrink`` that minimizes the mean squared output error of
    that group's slice, ``mean_t (x_g w_g - x_g Q(clamp(w, +-max_val))_g)^2``. Returns the clamped
    weight (same shape), to be rounded by the caller."""
    w = weight.detach().float()
    x = x.float()
    out, n = w.shape
    g = n if group_size is None else group_size
    groups = -(-n // g)
    pad = groups * g - n
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(out, groups, g)
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], groups, g)
    org_max = wp.abs().amax(-1, keepdim=True)  # [out, G, 1]
    ref = torch.einsum("tgk,ogk->gto", xp, wp)  # per-group partial outputs [G, n, out]
    best_err = torch.full((out, groups), float("inf"))
    best_max = org_max.clone()
    steps = max(1, int(max_shrink * grid))
    for i in range(steps):
        max_val = org_max * (1 - i / grid)
        clamped = torch.maximum(torch.minimum(wp, max_val), -max_val).reshape(out, groups * g)[:, :n]
        q = torch.nn.functional.pad(fake_quant(clamped), (0, pad)).reshape(out, groups, g)
        err = (torch.einsum("tgk,ogk->gto", xp, q) - ref).pow(2).mean(1).t()  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
    clamped = torch.maximum(torch.minimum(wp, best_max), -best_max)
    return clamped.reshape(out, groups * g)[:, :n].to(weight.dtype)


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (weights' max over every
    consumer's column ``j``), clamped at ``1e-5``."""
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@dataclass
class AWQOptions(MethodOptions):
    """Options of ``awq`` (``quantization={"method": "awq", "awq": {...}}``)."""

    grid: int = option(20, "migration strengths alpha in [0, 1) tried by the scale search", int_in(2, 100))
    clip: bool = option(True, "run AWQ's output-aware clip search after scaling", boolean())


class AWQ(QuantMethod):
    name = "awq"
    summary = "activation-aware scales folded into the preceding norms and linears, then an output-aware clip search"
    options = AWQOptions
    calibrated = True
    folds_input_scales = True
    propagates_float_outputs = True  # as llm-awq: scaling is exact in float and rounding is local

    def prepare_layer(self, ctx: LayerContext, options: AWQOptions) -> None:
        for producer, consumers in ctx.scaling_groups():
            if not all(c in ctx.stats for c in consumers):
                continue  # a consumer is skipped (kept in float): leave this group alone
            st = ctx.stats[consumers[0]]
            linears = [ctx.layer.get_submodule(c) for c in consumers]
            fqs = [ctx.fake_quant(ctx.bits[c]) for c in consumers]
            x = st.sample()[:AWQ_SCALE_ROWS]
            s, alpha, _ = awq_search_scale(x, [lin.weight for lin in linears], fqs, st.mean_abs.cpu(), options.grid)
            ctx.record("awq_alphas", ctx.prefix + consumers[0], alpha)
            ctx.fold(producer, consumers, s)
        if not options.clip:
            return
        skip_clip = set(ctx.attention_logit_linears())
        for n in ctx.names:
            if n in skip_clip:
                continue  # as llm-awq: q/k errors are absorbed by the softmax
            lin = ctx.layer.get_submodule(n)
            clamped = awq_search_clip(
                ctx.stats[n].sample()[:AWQ_CLIP_ROWS],
                lin.weight,
                ctx.fake_quant(ctx.bits[n]),
                ctx.fmt.group_size,
                ctx.fmt.clip_grid,
                ctx.fmt.clip_max_shrink,
            )
            with torch.no_grad():
                lin.weight.copy_(clamped)

    def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
        # the weights arrive scaled and clipped by prepare_layer: round them to nearest, no clip search
        return round_to_nearest(weight, replace(fmt, clip="none"), exclude), None

    def describe(self, options, clip):
        return (
            "activation-aware scaling (`awq`: per-channel scales folded into the preceding norms and linears, "
            "then an output-aware clip search)"
        )


METHOD = AWQ()
