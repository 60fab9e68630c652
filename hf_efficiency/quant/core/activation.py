"""Int8 activations (W8A8): activation quantizers and int8 x int8 matmul paths.

Pure tensor functions (no transformers import). Conventions:

* Weights: symmetric int8 per output channel, ``w = q_w * s_w[:, None]`` with ``q_w`` int8 in
  ``[-127, 127]`` of shape ``[out, in]`` and ``s_w`` float ``[out]``.
* Activations: symmetric int8 in ``[-127, 127]``, either dynamic per token
  (:func:`quantize_per_token`, scale ``[..., 1]``) or static per tensor (:func:`quantize_static`
  with a calibrated scalar from :func:`static_scale_from_samples`).
* Output: ``y[t, j] = s_x[t] * s_w[j] * sum_k q_x[t, k] q_w[j, k] (+ bias[j])``.

The exact reference (:func:`int8_linear_reference`) accumulates in int32 and applies the scales
in float32 in one fixed order, ``((float32(acc) * s_w) * s_x) + bias``, shared by every integer
path (:func:`_epilogue`), so those paths are bit-identical to it whenever their int32 sums are.

Paths of :func:`int8_linear` (measured on CPU by ``benchmarks/w8a8_cpu.py``):

* ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32) then the shared epilogue. Exact. On CPU
  torch 2.13 accepts any shape and the free view ``q_w.t()`` as the weight; on CUDA it needs
  ``m > 16`` and ``k, n`` multiples of 8, which :func:`int_mm_padded` takes care of.
* ``"onednn"``: ``torch.ops.onednn.qlinear_pointwise`` with a prepacked weight (CPU only). Fed
  uint8 activations (``q_x + 128``, zero point 128) because signed int8 activations fall back
  to oneDNN's reference kernel (``ref_int8``), ~1000x slower on AVX512-VNNI CPUs. Exact.
* ``"dequant"``: ``F.linear(q_x.float() * s_x, q_w.float() * s_w[:, None])`` with the float32
  dequantized weight cached by the caller. Equal to the reference within float32 rounding
  (the sum is of non-integer products), not bit-for-bit.

Reference points that are *not* W8A8 numerics (kept as functions for the benchmark, not as
paths): :func:`linear_fbgemm_dynamic` (``quantized::linear_dynamic``: its own per-tensor
asymmetric uint8 activation quantization) and :func:`linear_weight_int8pack`
(``aten._weight_int8pack_mm``: int8 weights, float activations).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

QMAX = 127
INT8_LINEAR_PATHS = ("int_mm", "onednn", "dequant")
# torch.quantile refuses inputs with more elements than this ("input tensor is too large").
QUANTILE_MAX_ELEMENTS = 2**24
# CUDA torch._int_mm (cuBLASLt) limits: m > 16, k and n multiples of 8.
INT_MM_CUDA_MIN_M = 17
INT_MM_CUDA_MULTIPLE = 8


# --------------------------------------------------------------------------- quantizers


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization, one scale per token (last-dim row).

    Args:
        x: float activations ``[..., k]`` (any float dtype; computed in float32).

    Returns:
        ``(q, scale)``: ``q`` int8 ``[..., k]`` in ``[-127, 127]`` with
        ``q = round_half_even(x / scale)`` and ``scale`` float32 ``[..., 1]`` equal to
        ``max_k |x| / 127``. An all-zero row gets scale 1.0 (codes 0), never nan/inf.

    No clamp is needed (saving a pass): for finite ``x``, ``|x| / scale <= 127 * (1 + 2**-22)``
    which rounds to at most 127. Inputs with inf/nan give undefined codes.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).div_(QMAX)
    scale.masked_fill_(scale == 0, 1.0)
    q = torch.div(xf, scale).round_().to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static symmetric int8 quantization with one calibrated scale for the whole tensor.

    Args:
        x: float activations of any shape.
        scale: a one-element positive tensor (e.g. from :func:`static_scale_from_samples`).

    Returns:
        int8 codes ``clamp(round_half_even(x / scale), -127, 127)``, same shape as ``x``;
        values beyond ``127 * scale`` are clamped.
    """
    if scale.numel() != 1:
        raise ValueError(f"static scale must have one element, got shape {tuple(scale.shape)}")
    s = scale.reshape(()).to(device=x.device, dtype=torch.float32)
    return torch.div(x.float(), s).round_().clamp_(-QMAX, QMAX).to(torch.int8)


def static_scale_from_samples(abs_values: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per-tensor static scale ``percentile(|x|) / 127`` from calibration samples.

    Args:
        abs_values: calibration activations (their absolute values are taken, so signed values
            are accepted too), any shape.
        percentile: in ``(0, 100]``; ``100`` is the exact max, other values use
            ``torch.quantile`` (linear interpolation).

    Returns:
        float32 0-d tensor, always positive and finite: if the percentile is 0 the scale falls
        back to ``max / 127``, and to ``1.0`` if every value is zero.

    ``torch.quantile`` refuses more than ``2**24`` elements; larger inputs are subsampled to
    ``2**24`` elements drawn uniformly with replacement by a fixed-seed generator (deterministic
    across calls; the estimate's error is tiny for percentiles not in the extreme tail, but a
    very high percentile like 99.9999 on > 16M values is then only approximate). The max used
    for ``percentile == 100`` and for the fallback is always over all values.
    """
    if not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    flat = abs_values.detach().reshape(-1).float().abs()
    if flat.numel() == 0:
        raise ValueError("static_scale_from_samples needs at least one value")
    amax = flat.max()
    if float(percentile) == 100:
        value = amax
    else:
        if flat.numel() > QUANTILE_MAX_ELEMENTS:
            gen = torch.Generator(device=flat.device).manual_seed(0)
            idx = torch.randint(0, flat.numel(), (QUANTILE_MAX_ELEMENTS,), generator=gen, device=flat.device)
            flat = flat[idx]
        value = torch.quantile(flat, float(percentile) / 100)
        if value <= 0:
            value = amax
    if value <= 0:
        value = torch.ones((), dtype=torch.float32, device=flat.device) * QMAX
    return (value / QMAX).reshape(()).to(torch.float32)


# --------------------------------------------------------------------------- helpers


def _as_2d(q_x: torch.Tensor, s_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_x`` as ``[m, k]`` and ``s_x`` as ``[m, 1]`` (per token) or 0-d (per tensor)."""
    q2 = q_x.reshape(-1, q_x.shape[-1])
    s = s_x.to(torch.float32)
    s2 = s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1)
    if s2.dim() == 2 and s2.shape[0] != q2.shape[0]:
        raise ValueError(f"s_x has {s2.shape[0]} scales for {q2.shape[0]} tokens")
    return q2, s2


def _epilogue(
    acc: torch.Tensor,
    s_x: torch.Tensor,
    s_w: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``((float32(acc) * s_w) * s_x) + bias`` in float32, then cast to ``out_dtype``.

    The single scaling order every integer path uses, so that they are bit-identical to
    :func:`int8_linear_reference`. ``acc`` is either the int32 sums (the int32 -> float32
    conversion is fused into the first multiply by type promotion) or a float32 tensor that
    already holds ``float32(acc) * s_w`` rounded once (oneDNN's output), then ``s_w`` is skipped.
    """
    if acc.dtype == torch.int32:
        y = torch.mul(acc, s_w.to(torch.float32))
    else:
        y = acc
    y.mul_(s_x)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _check_inputs(q_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor) -> None:
    if q_x.dtype != torch.int8 or q_w.dtype != torch.int8:
        raise TypeError(f"q_x and q_w must be int8, got {q_x.dtype} and {q_w.dtype}")
    if q_w.dim() != 2 or q_x.shape[-1] != q_w.shape[1]:
        raise ValueError(f"q_x [..., {q_x.shape[-1]}] does not match q_w {tuple(q_w.shape)} ([out, in])")
    if s_w.numel() != q_w.shape[0]:
        raise ValueError(f"s_w has {s_w.numel()} scales for {q_w.shape[0]} output channels")


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


# --------------------------------------------------------------------------- reference


def int8_linear_reference(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    q_w: torch.Tensor,
    s_w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact W8A8 output: int32 accumulation (plain int32 matmul), then the shared epilogue.

    Slow; for tests and error measurement. Exact while ``k * 127 * 127 < 2**31``.
    """
    _check_inputs(q_x, q_w, s_w)
    q2, s2 = _as_2d(q_x, s_x)
    acc = q2.to(torch.int32) @ q_w.to(torch.int32).t()
    out = _epilogue(acc, s2, s_w, bias, out_dtype)
    return out.reshape(*q_x.shape[:-1], q_w.shape[0])


# --------------------------------------------------------------------------- int_mm


def int_mm_padded(q_x: torch.Tensor, q_w_t: torch.Tensor, pad: Optional[bool] = None) -> torch.Tensor:
    """``torch._int_mm(q_x, q_w_t)`` (int32 ``[m, n]``) for any shapes.

    Args:
        q_x: int8 ``[m, k]``.
        q_w_t: int8 ``[k_w, n]`` with ``k_w >= k``; rows past ``k`` must be zero (a weight
            pre-padded once by :func:`prepare_weight` / :func:`pad_int_mm_weight`). Any strides:
            the view ``q_w.t()`` of a contiguous ``[n, k]`` weight is the usual layout.
        pad: ``None`` pads only where the device needs it (CUDA: ``m > 16``, ``k`` and ``n``
            multiples of 8; CPU has no constraint); ``True`` always applies the CUDA padding
            (to test it on CPU); ``False`` never pads.

    Returns:
        int32 ``[m, n]``, ``n = q_w_t.shape[1]`` (slice if the weight's ``n`` was pre-padded).
        Zero rows/columns added to reach the limits contribute nothing, so the result is exact.
    """
    m, k = q_x.shape
    k_w, n = q_w_t.shape
    if k_w < k:
        raise ValueError(f"q_w_t has {k_w} rows for k={k}")
    if pad is None:
        pad = q_x.device.type == "cuda"
    if not pad:
        if k_w != k:
            q_x = F.pad(q_x, (0, k_w - k))
        return torch._int_mm(q_x, q_w_t)
    k_p = _round_up(k_w, INT_MM_CUDA_MULTIPLE)
    n_p = _round_up(n, INT_MM_CUDA_MULTIPLE)
    m_p = max(m, INT_MM_CUDA_MIN_M)
    if (m_p, k_p) != (m, k):
        q_x = F.pad(q_x, (0, k_p - k, 0, m_p - m))
    if (k_p, n_p) != (k_w, n):
        q_w_t = pad_int_mm_weight(q_w_t, INT_MM_CUDA_MULTIPLE)
    out = torch._int_mm(q_x, q_w_t)
    if (m_p, n_p) != (m, n):
        out = out[:m, :n]
    return out


def pad_int_mm_weight(q_w_t: torch.Tensor, multiple: int = INT_MM_CUDA_MULTIPLE) -> torch.Tensor:
    """Zero-pad a ``[k, n]`` int8 weight to multiples of ``multiple`` in both dims.

    Returns a column-major ``[k_p, n_p]`` view (``.t()`` of a contiguous ``[n_p, k_p]``), the
    layout of ``q_w.t()``; unchanged if nothing needs padding.
    """
    k, n = q_w_t.shape
    k_p, n_p = _round_up(k, multiple), _round_up(n, multiple)
    if (k_p, n_p) == (k, n):
        return q_w_t
    return F.pad(q_w_t.t(), (0, k_p - k, 0, n_p - n)).contiguous().t()


def linear_int_mm(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    q_w_t: torch.Tensor,
    s_w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 through ``torch._int_mm``: exact int32 sums, then the shared epilogue.

    ``q_x [m, k]`` int8, ``s_x [m, 1]`` or 0-d, ``q_w_t`` int8 ``[k(_p), n(_p)]`` (``q_w.t()``,
    possibly pre-padded), ``s_w [n]``. Bit-identical to :func:`int8_linear_reference`.
    """
    n = s_w.numel()
    acc = int_mm_padded(q_x, q_w_t)
    if acc.shape[1] != n:
        acc = acc[:, :n]
    return _epilogue(acc, s_x, s_w, bias, out_dtype)


# --------------------------------------------------------------------------- oneDNN


def onednn_available() -> bool:
    """Whether ``torch.ops.onednn.qlinear_pointwise`` exists in this torch build."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_prepack(q_w: torch.Tensor, s_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`linear_onednn` needs, built once (CPU): the oneDNN-blocked int8 weight, the
    float32 per-channel scales and the (zero) int64 weight zero points."""
    packed = torch.ops.onednn.qlinear_prepack(q_w.contiguous(), None)
    zeros = torch.zeros(q_w.shape[0], dtype=torch.int64, device=q_w.device)
    return packed, s_w.to(torch.float32).contiguous(), zeros


def linear_onednn(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    prepacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 through oneDNN's int8 matmul (``onednn::qlinear_pointwise``), CPU only.

    The activation goes in as uint8 ``q_x + 128`` with zero point 128 (a sign-bit flip): same
    integer sums, but the fast u8s8 VNNI kernel instead of the s8s8 reference fallback. oneDNN
    returns ``float32(acc) * s_w`` (its per-channel weight scale; the activation scale is 1), and
    the per-token ``s_x`` and bias are applied afterwards by the shared epilogue, so the result is
    bit-identical to :func:`int8_linear_reference` (checked in the tests).
    """
    packed_w, s_w, w_zero_points = prepacked
    u_x = q_x.contiguous().view(torch.uint8).bitwise_xor(128)
    acc = torch.ops.onednn.qlinear_pointwise(
        u_x, 1.0, 128, packed_w, s_w, w_zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return _epilogue(acc, s_x, s_w, bias, out_dtype)  # acc already float32(sum) * s_w


# --------------------------------------------------------------------------- dequant


def dequantize_int8_weight(q_w: torch.Tensor, s_w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight ``q_w * s_w[:, None]`` ``[out, in]`` (cache it for :func:`linear_dequant`)."""
    return (q_w.to(torch.float32) * s_w.to(torch.float32)[:, None]).to(dtype)


def linear_dequant(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    w_dequant: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 by float matmul: ``F.linear(q_x.float() * s_x, w_dequant, bias)``.

    ``w_dequant`` from :func:`dequantize_int8_weight`. Same value as the reference up to float32
    rounding of the non-integer products and sums (relative error ~1e-6), not bit-for-bit.
    """
    x = q_x.to(torch.float32).mul_(s_x)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x, w_dequant.to(torch.float32), b).to(out_dtype)


# --------------------------------------------------------------------------- dispatch


def available_paths(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The :data:`INT8_LINEAR_PATHS` usable on ``device`` with this torch build."""
    dev = torch.device(device).type
    paths = []
    if hasattr(torch, "_int_mm"):
        paths.append("int_mm")
    if dev == "cpu" and onednn_available():
        paths.append("onednn")
    paths.append("dequant")
    return tuple(paths)


def _check_path(path: str) -> None:
    if path not in INT8_LINEAR_PATHS:
        raise ValueError(f"unknown int8_linear path {path!r}; allowed values: {', '.join(INT8_LINEAR_PATHS)}")


def prepare_weight(q_w: torch.Tensor, s_w: torch.Tensor, path: str) -> Any:
    """The per-path weight layout :func:`int8_linear` wants as ``prepared`` (build once, cache).

    * ``"int_mm"``: ``q_w.t()`` (a free view, no copy) on CPU; on CUDA a zero-padded copy whose
      ``k`` and ``n`` are multiples of 8.
    * ``"onednn"``: :func:`onednn_prepack` (a blocked int8 copy, scales, zero points).
    * ``"dequant"``: :func:`dequantize_int8_weight` in float32 (4x the int8 bytes).
    """
    _check_path(path)
    if path == "int_mm":
        q_w_t = q_w.contiguous().t()
        return pad_int_mm_weight(q_w_t) if q_w.device.type == "cuda" else q_w_t
    if path == "onednn":
        return onednn_prepack(q_w, s_w)
    return dequantize_int8_weight(q_w, s_w)


def int8_linear(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    q_w: torch.Tensor,
    s_w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    path: str = "int_mm",
    out_dtype: torch.dtype = torch.float32,
    prepared: Any = None,
) -> torch.Tensor:
    """W8A8 linear ``y = s_x * s_w * (q_x @ q_w.T) + bias`` through the named ``path``.

    Args:
        q_x: int8 activation codes ``[..., k]``.
        s_x: activation scales, ``[..., 1]`` (per token) or one element (per tensor).
        q_w: int8 weight codes ``[n, k]``; ``s_w``: float weight scales ``[n]``.
        bias: optional ``[n]``, added in float32.
        path: one of :data:`INT8_LINEAR_PATHS` (``"int_mm"``, ``"onednn"``, ``"dequant"``).
        out_dtype: dtype of the result (computed in float32, cast at the end).
        prepared: the cached :func:`prepare_weight` ``(q_w, s_w, path)``; built per call if
            ``None`` (costly for ``"onednn"`` and ``"dequant"``, free for ``"int_mm"`` on CPU).

    Returns:
        ``[..., n]`` in ``out_dtype``.

    Raises:
        ValueError: unknown ``path`` (the message lists the allowed values) or bad shapes.
    """
    _check_path(path)
    _check_inputs(q_x, q_w, s_w)
    if prepared is None:
        prepared = prepare_weight(q_w, s_w, path)
    q2, s2 = _as_2d(q_x, s_x)
    if path == "int_mm":
        out = linear_int_mm(q2, s2, prepared, s_w, bias, out_dtype)
    elif path == "onednn":
        out = linear_onednn(q2, s2, prepared, bias, out_dtype)
    else:
        out = linear_dequant(q2, s2, prepared, bias, out_dtype)
    return out.reshape(*q_x.shape[:-1], q_w.shape[0])


# --------------------------------------------------------------------------- non-W8A8 references


def fbgemm_prepack(q_w: torch.Tensor, s_w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Any:
    """``quantized::linear_prepack`` of the per-channel qint8 weight (current quantized engine).

    torch 2.13 warns that quantized tensor dtypes (qint8, quint8) are deprecated; that warning
    is silenced here, but it means this route may disappear from torch.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch._make_per_channel_quantized_tensor(
            q_w.contiguous(), s_w.to(torch.float64), torch.zeros(q_w.shape[0], dtype=torch.int64), 0
        )
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.to(torch.float32))


def linear_fbgemm_dynamic(x: torch.Tensor, packed: Any, reduce_range: bool = False) -> torch.Tensor:
    """``quantized::linear_dynamic`` on float ``x [m, k]``: NOT our W8A8 numerics.

    It quantizes the activation itself, per tensor, asymmetric uint8 (7-bit with
    ``reduce_range``), then int8 matmul with the prepacked per-channel weight. Its error versus
    the per-token reference is measured by the benchmark.
    """
    return torch.ops.quantized.linear_dynamic(x.to(torch.float32), packed, reduce_range)


def linear_weight_int8pack(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``aten._weight_int8pack_mm``: int8 weight, float activations (weight-only, not W8A8)."""
    return torch.ops.aten._weight_int8pack_mm(x, q_w.contiguous(), s_w.to(x.dtype))
