"""Learned rounding: group-wise quantization whose rounding offsets and clip ranges are trainable.

The AutoRound (SignRound, Cheng et al. 2023) parametrization of one weight ``W [out, in]`` in the
group-wise format of :mod:`hf_efficiency.quant.core.scheme`: per weight a rounding offset
``v in [-0.5, 0.5]``, per group two range factors ``alpha, beta in [lo, 1]`` shrinking the group's
maximum and minimum. The fake-quantized weight

    scale = (alpha * max - beta * min) / (2**b - 1)          (stored dtype, straight-through)
    u     = clamp(round(W / scale + v) + zero, 0, 2**b - 1)   (straight-through rounding)
    W_hat = (u - zero) * scale                               (zero = round(-beta * min / scale))

is differentiable in ``v``, ``alpha`` and ``beta`` (straight-through estimators for the roundings), so
a block's output error can be minimized over them; :func:`pack_learned` then stores exactly
``W_hat`` in the ordinary packed format (codes, scales, integer zero points or float minima), so the
result loads and runs like any other quantized weight. ``v = 0, alpha = beta = 1`` is round-to-nearest
on the min/max range. Pure tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheme import QuantizedWeight, check_zero_point, grouped, masked_range, pack_groups


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _ste_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back (the stored value), with an identity gradient."""
    return x + (x.to(dtype).float() - x).detach()


@dataclass
class LearnedRounding:
    """Trainable rounding of one matrix (see the module docstring). Create with :meth:`init`."""

    wg: torch.Tensor  # [out, G, g] the float weight, grouped (zero-padded); constant
    valid: torch.Tensor  # [1, G, g] bool: not padding
    wmin: torch.Tensor  # [out, G, 1] group minima (widened to include 0 for integer zero points)
    wmax: torch.Tensor  # [out, G, 1] group maxima
    v: torch.Tensor  # [out, G, g] rounding offsets (trainable)
    alpha: torch.Tensor  # [out, G, 1] maximum factor (trainable)
    beta: torch.Tensor  # [out, G, 1] minimum factor (trainable; unused when symmetric)
    bits: int
    group_size: int | None
    in_features: int
    symmetric: bool
    zero_point: str
    scale_dtype: torch.dtype

    @classmethod
    def init(
        cls,
        weight: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool = False,
        zero_point: str = "integer",
        scale_dtype: torch.dtype = torch.float16,
    ) -> LearnedRounding:
        """Round-to-nearest on the min/max range as the starting point (``v = 0``, factors 1)."""
        check_zero_point(zero_point)
        w = weight.detach().float()
        wg, valid = grouped(w, group_size)
        wmin, wmax = masked_range(wg, valid)
        if not symmetric and zero_point == "integer":
            wmin, wmax = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
        return cls(
            wg=wg,
            valid=valid,
            wmin=wmin,
            wmax=wmax,
            v=torch.zeros_like(wg, requires_grad=True),
            alpha=torch.ones_like(wmax, requires_grad=True),
            beta=torch.ones_like(wmin, requires_grad=True),
            bits=bits,
            group_size=group_size,
            in_features=w.shape[1],
            symmetric=symmetric,
            zero_point=zero_point,
            scale_dtype=scale_dtype,
        )

    def parameters(self) -> list[torch.Tensor]:
        return [self.v, self.alpha] if self.symmetric else [self.v, self.alpha, self.beta]

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(scale, zero or None, minimum or None)``: the stored scale and the offset of the grid."""
        qmax = 2**self.bits - 1
        tiny = torch.finfo(self.scale_dtype).tiny if self.scale_dtype != torch.float16 else 2.0**-24
        if self.symmetric:
            amax = torch.maximum(self.wmax.abs(), self.wmin.abs()) * self.alpha
            scale = amax / (2 ** (self.bits - 1) - 1)
        else:
            scale = (self.wmax * self.alpha - self.wmin * self.beta) / qmax
        scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
        scale = _ste_cast(scale, self.scale_dtype)
        if self.symmetric:
            return scale, None, None
        if self.zero_point == "integer":
            zero = torch.clamp(_ste_round(-self.wmin * self.beta / scale), 0, qmax)
            return scale, zero, None
        return scale, None, _ste_cast(self.wmin * self.beta, self.scale_dtype)

    def fake_quant(self) -> torch.Tensor:
        """The de-quantized weight ``[out, in]``, differentiable in ``v``, ``alpha`` and ``beta`` through the
        straight-through estimator (one fused autograd function: see `_FakeQuant`)."""
        w = _FakeQuant.apply(self.v, self.alpha, self.beta, self)
        return w.reshape(w.shape[0], -1)[:, : self.in_features]

    def reference_fake_quant(self) -> torch.Tensor:
        """:meth:`fake_quant` written with autograd's own operations (slower; tests compare the two)."""
        qmax = 2**self.bits - 1
        scale, zero, minimum = self._grid()
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            u = torch.clamp(_ste_round(self.wg / scale + self.v), -half, half - 1)
            w = u * scale
        elif zero is not None:
            u = torch.clamp(_ste_round(self.wg / scale + self.v) + zero, 0, qmax)
            w = (u - zero) * scale
        else:
            u = torch.clamp(_ste_round((self.wg - minimum) / scale + self.v), 0, qmax)
            w = u * scale + minimum
        return w.reshape(w.shape[0], -1)[:, : self.in_features]

    @torch.no_grad()
    def clamp_(self, min_factor: float) -> None:
        """Keep the parameters in their ranges after an update."""
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(min_factor, 1.0)
        self.beta.clamp_(min_factor, 1.0)

    @torch.no_grad()
    def pack(self) -> QuantizedWeight:
        """The packed weight whose de-quantization is :meth:`fake_quant`'s value."""
        scale, zero, minimum = self._grid()
        if zero is not None:
            minimum = -(zero * scale)
        # round((W + v * s - m) / s) == round(W / s + v) + zero: the stored codes are the trained ones
        target = self.wg + self.v * scale
        return pack_groups(
            target,
            scale,
            minimum,
            self.bits,
            self.group_size,
            self.in_features,
            self.scale_dtype,
            self.zero_point if not self.symmetric else "float",
        )


class _FakeQuant(torch.autograd.Function):
    """Forward: the fake-quantized weight of a `LearnedRounding`. Backward: the gradients autograd gives
    `LearnedRounding.reference_fake_quant` (straight-through roundings: identity gradient, rounded
    value), written out per element so that no graph of a dozen full-size tensors is kept:

    * ``dv = g * scale`` where the code is not clamped, else 0;
    * ``d scale``: ``u - z - W / scale`` inside (integer zero point; ``u - (W - m) / scale`` with a float
      minimum, ``u - W / scale`` symmetric), and at a clamped code the code's own value minus the zero
      point's dependence on the scale;
    * ``alpha`` and ``beta`` move the scale (``d scale / d alpha = max / qmax``) and the zero point or
      minimum (``beta * min``)."""

    @staticmethod
    def forward(ctx, v, alpha, beta, r: LearnedRounding):  # noqa: D102
        with torch.no_grad():
            scale, zero, minimum = r._grid()
            if r.symmetric:
                half = 2 ** (r.bits - 1)
                lo, hi = -half, half - 1
                u = torch.round(r.wg / scale + v)
            elif zero is not None:
                lo, hi = 0, 2**r.bits - 1
                u = torch.round(r.wg / scale + v) + zero
            else:
                lo, hi = 0, 2**r.bits - 1
                u = torch.round((r.wg - minimum) / scale + v)
            u.clamp_(lo, hi)
            if zero is not None:
                w = (u - zero) * scale
            elif minimum is not None:
                w = u * scale + minimum
            else:
                w = u * scale
        ctx.r, ctx.lo, ctx.hi = r, lo, hi
        ctx.save_for_backward(v, u, scale, zero if zero is not None else minimum)
        return w

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        v, u, scale, offset = ctx.saved_tensors
        r: LearnedRounding = ctx.r
        g = g * r.valid
        wg = r.wg
        if r.symmetric:
            inside = (r.wg / scale + v).round().ge(ctx.lo) & (r.wg / scale + v).round().le(ctx.hi)
            coef_s = torch.where(inside, u - wg / scale, u)
            gv = torch.where(inside, g * scale, 0.0)
            amax = torch.maximum(r.wmax.abs(), r.wmin.abs())
            ga = (g * coef_s).sum(-1, keepdim=True) * amax / (2 ** (r.bits - 1) - 1)
            return gv, ga, None, None
        qmax = 2**r.bits - 1
        if r.zero_point == "integer":
            zero = offset
            raw = torch.round(wg / scale + v) + zero
            inside = (raw >= 0) & (raw <= qmax)
            # clamped code u: W_hat = (u - z) * scale with z = round(-beta * min / scale) (straight-through)
            zb = r.wmin * r.beta / scale  # = -z before rounding
            coef_s = torch.where(inside, u - zero - wg / scale, u - zero - zb)
            coef_b = torch.where(inside, 0.0, r.wmin)  # through z's direct dependence on beta
        else:
            minimum = offset
            raw = torch.round((wg - minimum) / scale + v)
            inside = (raw >= 0) & (raw <= qmax)
            coef_s = torch.where(inside, u - (wg - minimum) / scale, u)
            coef_b = torch.where(inside, 0.0, r.wmin)  # W_hat = u * scale + beta * min at a clamped code
        gv = torch.where(inside, g * scale, 0.0)
        gs = (g * coef_s).sum(-1, keepdim=True)
        ga = gs * r.wmax / qmax
        gb = -gs * r.wmin / qmax + (g * coef_b).sum(-1, keepdim=True)
        return gv, ga, gb, None


__all__ = ["LearnedRounding"]
