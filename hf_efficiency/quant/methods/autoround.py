"""``autoround``: rounding offsets and clip ranges learned per decoder layer by signed gradient descent.

AutoRound (SignRound; Cheng et al., 2023): for every linear of a decoder layer, a rounding offset per
weight and a shrink factor of each group's maximum and minimum (`LearnedRounding`) are tuned so that the
layer's output on the calibration inputs (the already-quantized model's activations) matches the float
layer's output (mean squared error). The update is signed gradient descent, ``p -= lr * sign(grad)``
with ``lr`` decaying linearly to 0 (the offsets then move by at most ``lr * iters / 2`` in total), on
a few calibration windows per step. The result is stored in the ordinary packed format: an
``autoround`` checkpoint loads, exports and runs exactly like a round-to-nearest one.

The layer's forward runs under bfloat16 autocast when ``mixed_precision`` is on (CPU and CUDA;
the loss and the parameters stay float32): about 3x faster on a CPU with AVX-512 BF16 and the signs of
the gradients are what the update uses. The tuned weights are kept only if they lower the layer's
output error on the first calibration windows (measured in float32) below round-to-nearest's.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.func import functional_call

from ..core.learned_rounding import LearnedRounding
from ..core.scheme import QuantizedWeight
from .base import LayerContext, MethodOptions, QuantMethod, boolean, float_open, int_in, option
from .rtn import round_to_nearest

logger = logging.getLogger(__name__)

#: calibration pieces (of ``windows_per_step`` windows) on which tuned and round-to-nearest errors are compared
CHECK_PIECES = 8


@dataclass
class AutoRoundOptions(MethodOptions):
    """Options of ``autoround`` (``quantization={"method": "autoround", "autoround": {...}}``)."""

    iters: int = option(50, "signed-gradient steps per decoder layer", int_in(1, 10000))
    lr: float = option(
        0.0, "step size (0: 1 / iters, AutoRound's default)", (lambda v: _is_lr(v), "0 or a float in (0, 1)")
    )
    min_factor: float = option(0.5, "smallest shrink factor of a group's range", float_open(0.0, 1.0))
    windows_per_step: int = option(1, "calibration windows per step", int_in(1, 1024))
    mixed_precision: bool = option(True, "run the layer's forward in bfloat16 autocast while tuning", boolean())


def _is_lr(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _slice(value: Any, rows: slice, batch: int) -> Any:
    """``value`` restricted to the batch rows ``rows`` (tensors and tuples whose first dim is the batch)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_slice(v, rows, batch) for v in value)
    return value


def minibatches(batches: list[Any], targets: list[torch.Tensor], rows: int) -> list[tuple[Any, dict, torch.Tensor]]:
    """``(hidden, kwargs, target)`` pieces of at most ``rows`` windows from the captured layer batches."""
    out = []
    for b, t in zip(batches, targets):
        n = b.hidden.shape[0]
        for start in range(0, n, rows):
            s = slice(start, start + rows)
            out.append((b.hidden[s], {k: _slice(v, s, n) for k, v in b.kwargs.items()}, t[s]))
    return out


def _layer_output(layer, weights: dict[str, torch.Tensor], hidden, kwargs) -> torch.Tensor:
    out = functional_call(layer, weights, (hidden,), kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _output_error(layer, weights, pieces) -> float:
    total, count = 0.0, 0
    for hidden, kwargs, target in pieces:
        total += float((_layer_output(layer, weights, hidden, kwargs).float() - target.float()).pow(2).sum())
        count += target.numel()
    return total / max(count, 1)


def tune_layer_rounding(
    layer: torch.nn.Module,
    roundings: dict[str, LearnedRounding],
    pieces: list[tuple[Any, dict, torch.Tensor]],
    iters: int,
    lr: float,
    min_factor: float,
    mixed_precision: bool = True,
) -> tuple[float, float]:
    """Tune ``roundings`` (linear name inside ``layer`` -> its `LearnedRounding`) in place so that
    ``layer`` with the fake-quantized weights reproduces each piece's target output. Returns the mean
    squared output error over the first `CHECK_PIECES` pieces before and after (float32 forward); the parameters are reset
    to round-to-nearest when tuning did not lower it."""
    params = [p for r in roundings.values() for p in r.parameters()]
    start = [p.detach().clone() for p in params]

    def weights() -> dict[str, torch.Tensor]:
        return {f"{n}.weight": r.fake_quant() for n, r in roundings.items()}

    check = pieces[:CHECK_PIECES]
    before = _output_error(layer, weights(), check)
    device = pieces[0][0].device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if mixed_precision and device.type in ("cpu", "cuda")
        else contextlib.nullcontext()
    )
    for step in range(iters):
        hidden, kwargs, target = pieces[step % len(pieces)]
        with autocast:
            out = _layer_output(layer, weights(), hidden, kwargs)
        loss = (out.float() - target.float()).pow(2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        step_lr = lr * (1.0 - step / iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(step_lr * torch.sign(g))
        for r in roundings.values():
            r.clamp_(min_factor)
    after = _output_error(layer, weights(), check)
    if not after < before:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        after = before
    return before, after


class AutoRound(QuantMethod):
    name = "autoround"
    summary = (
        "rounding offsets and clip ranges tuned per decoder layer by signed gradient descent on the "
        "layer's output error (AutoRound)"
    )
    options = AutoRoundOptions
    calibrated = True
    tunes_layer = True
    supports_outliers = False

    def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
        # outside the decoder layers (no calibration inputs): round to nearest
        return round_to_nearest(weight, fmt, exclude), None

    def tune_layer(
        self, ctx: LayerContext, options: AutoRoundOptions, batches: list[Any], targets: list[torch.Tensor]
    ) -> dict[str, QuantizedWeight]:
        fmt = ctx.fmt
        layer = ctx.layer
        roundings = {}
        for n in ctx.names:
            lin = layer.get_submodule(n)
            f = replace(fmt, bits=ctx.bits[n])
            roundings[n] = LearnedRounding.init(
                lin.weight.detach().to(batches[0].hidden.device),
                f.bits,
                f.group_size,
                f.symmetric,
                f.zero_point,
                f.scale_dtype,
            )
        pieces = minibatches(batches, targets, options.windows_per_step)
        lr = options.lr or 1.0 / options.iters
        with torch.enable_grad():
            before, after = tune_layer_rounding(
                layer, roundings, pieces, options.iters, lr, options.min_factor, options.mixed_precision
            )
        ctx.record("tuned_error", ctx.prefix.rstrip("."), (before, after))
        logger.info(f"{ctx.prefix.rstrip('.')}: output MSE {before:.4g} (round-to-nearest) -> {after:.4g}")
        return {n: r.pack() for n, r in roundings.items()}

    def describe(self, options: AutoRoundOptions, clip: str) -> str:
        return (
            f"AutoRound (`autoround`: rounding offsets and group clip ranges tuned by signed gradient descent, "
            f"{options.iters} steps per decoder layer, on the layer's output error)"
        )


METHOD = AutoRound()
