"""Triton weight-only int4/int8 matmul for `QuantLinear` on CUDA (the ``"cuda_triton"`` path of :mod:`.dispatch`).

One kernel computes ``y[M, N] = x[M, K] @ W_hat[N, K].T (+ bias)`` reading the module's packed int32 words in
place (no repacked copy, no kernel layout beside the module):

* codes: 4 or 8 bits, the little-endian bit stream of :mod:`..core.packing` (code ``k`` of a row sits in word
  ``k // (32 / bits)`` at bit ``(k % (32 / bits)) * bits``; rows padded to a multiple of 32 codes);
* groups: per channel (``group_size=None``) or any multiple of 32 codes, the last group may be partial;
* grids: symmetric (``(u - 2**(bits-1)) * scale``), asymmetric with a float minimum (``u * scale + min``) or with
  integer zero points (``(u - zero) * scale``), scales and minima in float16/bfloat16/float32, zero points uint8;
* activations: float16/bfloat16/float32, accumulated in float32; the output has the activation dtype.

Per block of ``BLOCK_K`` codes (always inside one group) the kernel multiplies the raw codes with ``x`` (codes up
to 255 are exact in every activation dtype), then applies the group's scale and offset once:
``acc += scale * (x . u) + offset * sum(x)`` with ``offset`` the minimum, ``-zero * scale`` or
``-2**(bits-1) * scale`` (the fused CPU kernel's formula). Nothing is rounded to the activation dtype before the
output, so the result is closer to the float32 reference than the ``dequant`` path in bf16/fp16 is.

A single activation row (decoding) runs a reduction over ``[BLOCK_K, BLOCK_N]`` tiles on the CUDA cores; more rows
run ``tl.dot`` on 16-row tiles (``input_precision="ieee"`` for float32 activations: no TF32). Small ``N`` splits
``K`` over programs (``split_k``); the partial sums land in a float32 buffer that is summed in a fixed order, so
results are deterministic. The kernel accepts any number of rows, but dispatch sends it at most
``CUDA_KERNEL_MAX_ROWS``; launch parameters are untuned defaults until a GPU run measures them.

Triton is optional: without it this module still imports, :func:`triton_available` is False and dispatch never
picks the path. With ``TRITON_INTERPRET=1`` set before triton is imported, the kernel runs on CPU tensors in
Triton's interpreter (how the tests check it without a GPU).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..modules.linear import QuantLinear

try:  # optional dependency: importing hf_efficiency never needs it
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything else
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: code widths the kernel reads in place
TRITON_BITS = (4, 8)
#: activation dtypes the kernel takes (accumulation is float32 for all of them)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MODE_SYMMETRIC, _MODE_MIN, _MODE_ZERO = 0, 1, 2


def triton_available() -> bool:
    """Whether triton imports (the ``"cuda_triton"`` path needs it; dispatch never picks the path otherwise)."""
    return triton is not None


def unavailable_reason() -> str | None:
    """Why triton could not be imported (``None`` when it was)."""
    return _IMPORT_ERROR


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): then CPU tensors are accepted."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ineligible_reason(module: "QuantLinear") -> str | None:
    """Why the kernel cannot compute ``module`` (``None`` when it can): it reads 4- and 8-bit codes in groups of
    whole 32-code blocks (or per channel), without outliers, act-order permutations or int8 activations."""
    if module.bits not in TRITON_BITS:
        return f"bits={module.bits} (the Triton kernel reads {' and '.join(map(str, TRITON_BITS))}-bit codes)"
    g = module.group_size
    if g is not None and (g <= 0 or g % 32):
        return f"group_size={g} (the Triton kernel needs per-channel scales or groups that are multiples of 32)"
    if getattr(module, "outliers", 0):
        return "outliers are kept (only the dequant path applies them)"
    if getattr(module, "weight_perm", None) is not None:
        return "act-order column permutation (weight_perm)"
    if getattr(module, "act_mode", None):
        return f"int8 activations (act_mode={module.act_mode!r}) take the w8a8 path"
    return None


def eligible(module: "QuantLinear") -> bool:
    """Whether the Triton kernel can compute ``module`` (see :func:`ineligible_reason`)."""
    return ineligible_reason(module) is None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(m: int, n: int, k: int, group_size: int | None, device: torch.device) -> dict[str, int]:
    """Block sizes and K split for a call (untuned defaults: no GPU has timed them yet).

    ``BLOCK_K`` divides the group (so each block has one scale); ``BLOCK_M`` is 1 for a single row (the reduction
    variant) and 16 otherwise (``tl.dot``'s smallest tile); ``split_k`` spreads ``K`` over programs when the
    ``N``-blocks alone would leave most SMs idle."""
    block_k = 128
    if group_size is not None:
        while group_size % block_k:
            block_k //= 2  # group_size is a multiple of 32: stops at 32 at the latest
    block_k = min(block_k, max(32, triton.next_power_of_2(k)))
    block_m = 1 if m == 1 else 16
    block_n = 64
    split_k = 1
    if device.type == "cuda":
        programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if programs < sms:
            split_k = max(1, min(8, sms // programs, triton.cdiv(k, 4 * block_k)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "split_k": split_k}


if triton is not None:

    @triton.jit
    def _weight_only_linear_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        min_ptr,
        zero_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        stride_os,
        groups,
        k_per_split,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,  # 0: per channel
        MODE: tl.constexpr,  # 0 symmetric, 1 float minimum, 2 integer zero point
        HAS_BIAS: tl.constexpr,
        FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        PER_WORD: tl.constexpr = 32 // BITS
        CODE_MASK: tl.constexpr = (1 << BITS) - 1
        HALF: tl.constexpr = 1 << (BITS - 1)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        raw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # per channel: unscaled x . u
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per channel: sum(x)
        k_start = pid_k * k_per_split
        for kk in range(0, k_per_split, BLOCK_K):
            k0 = k_start + kk
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            words = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // PER_WORD),
                mask=n_mask[None, :] & k_mask[:, None],
                other=0,
            )  # [BLOCK_K, BLOCK_N]: each word read PER_WORD times (cached)
            codes = (words >> ((offs_k[:, None] % PER_WORD) * BITS)) & CODE_MASK
            if BLOCK_M == 1:
                part = tl.sum(x.to(tl.float32)[:, :, None] * codes.to(tl.float32)[None, :, :], axis=1)
            elif FP32_DOT:
                part = tl.dot(x.to(tl.float32), codes.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, codes.to(x.dtype))  # codes < 256: exact in fp16/bf16; fp32 accumulation
            part_xsum = tl.sum(x.to(tl.float32), axis=1)
            if GROUP == 0:
                raw += part
                xsum += part_xsum
            else:
                g = k0 // GROUP  # BLOCK_K divides GROUP: one group per block
                s = tl.load(scale_ptr + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
                if MODE == 0:
                    off = -(s * HALF)
                elif MODE == 1:
                    off = tl.load(min_ptr + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
                else:
                    z = tl.load(zero_ptr + offs_n * groups + g, mask=n_mask, other=0).to(tl.float32)
                    off = -(z * s)
                acc += part * s[None, :] + part_xsum[:, None] * off[None, :]
        if GROUP == 0:
            s = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if MODE == 0:
                off = -(s * HALF)
            elif MODE == 1:
                off = tl.load(min_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            else:
                z = tl.load(zero_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
                off = -(z * s)
            acc = raw * s[None, :] + xsum[:, None] * off[None, :]
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += b[None, :]
        out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def weight_only_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    in_features: int,
    group_size: int | None,
    minimum: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W_hat.T (+ bias)`` -> ``[M, N]`` in ``x``'s dtype, with ``W_hat`` given by packed codes.

    ``weight``: int32 ``[N, ceil(K/32) * bits]`` packed codes; ``scale``: ``[N, G]``; ``minimum`` (float) or
    ``zero`` (uint8 integer zero points) ``[N, G]`` for asymmetric grids, neither for the symmetric grid
    (codes offset by ``2**(bits-1)``). ``bias`` is cast to ``x``'s dtype first, then added in float32 (as
    ``F.linear`` with a bias of that dtype). ``split_k`` / ``block_n`` override :func:`launch_config`.
    Tensors must be on CUDA (or on CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError(f"the cuda_triton path needs triton, which could not be imported ({_IMPORT_ERROR})")
    if bits not in TRITON_BITS:
        raise ValueError(f"bits={bits} is not allowed; allowed values: {', '.join(map(str, TRITON_BITS))}")
    if group_size is not None and (group_size <= 0 or group_size % 32):
        raise ValueError(f"group_size={group_size} is not allowed; allowed values: None or a multiple of 32")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activations of dtype {x.dtype} are not allowed; allowed values: {ACTIVATION_DTYPES}")
    if minimum is not None and zero is not None:
        raise ValueError("give a float minimum or integer zero points, not both")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    words = -(-k // 32) * bits
    if weight.dtype != torch.int32 or tuple(weight.shape) != (n, words):
        raise ValueError(f"weight must be int32 [{n}, {words}] packed codes, got {weight.dtype} {tuple(weight.shape)}")
    groups = 1 if group_size is None else -(-k // group_size)
    for name, t in (("scale", scale), ("minimum", minimum), ("zero", zero)):
        if t is not None and tuple(t.shape) != (n, groups):
            raise ValueError(f"{name} must be [{n}, {groups}], got {tuple(t.shape)}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton kernel runs on CUDA tensors (got {x.device.type}); set TRITON_INTERPRET=1 before importing "
            "triton to run it on CPU in Triton's interpreter"
        )
    if m == 0:
        return x.new_empty(0, n)
    x = x.contiguous()
    weight = weight.contiguous()
    scale = scale.contiguous()
    cfg = launch_config(m, n, k, group_size, x.device)
    block_n = block_n or cfg["BLOCK_N"]
    split = max(1, min(split_k or cfg["split_k"], triton.cdiv(k, cfg["BLOCK_K"])))
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)  # no empty split
    mode = _MODE_SYMMETRIC if minimum is None and zero is None else (_MODE_MIN if zero is None else _MODE_ZERO)
    bias_x = None if bias is None else bias.to(x.dtype).contiguous()
    # Triton's interpreter (numpy) has no bfloat16 arithmetic: its int->bf16 casts and bf16 dots work on the raw
    # bits and its fp32->bf16 cast does not round to nearest even. There the bf16 tiles are multiplied in float32
    # (the same numbers: codes and bf16 values multiply exactly in float32) and torch rounds the output.
    emulate_bf16 = x.dtype == torch.bfloat16 and interpreting()
    direct = split == 1 and not emulate_bf16  # the kernel writes the output in x's dtype, bias included
    out = torch.empty(split, m, n, device=x.device, dtype=x.dtype if direct else torch.float32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, cfg["BLOCK_M"]), split)
    _weight_only_linear_kernel[grid](
        x,
        weight,
        scale,
        scale if minimum is None else minimum.contiguous(),  # unused pointers still need a tensor
        scale if zero is None else zero.contiguous(),
        scale if bias_x is None or not direct else bias_x,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(1),
        out.stride(0),
        groups,
        k_per_split,
        BITS=bits,
        GROUP=0 if group_size is None else group_size,
        MODE=mode,
        HAS_BIAS=bias_x is not None and direct,
        FP32_DOT=x.dtype == torch.float32 or emulate_bf16,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=block_n,
        BLOCK_K=cfg["BLOCK_K"],
    )
    if direct:
        return out[0]
    y = out.sum(0)  # fixed order: deterministic
    if bias_x is not None:
        y = y + bias_x.float()
    return y.to(x.dtype)


def forward(module: "QuantLinear", x: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """``module(x)`` through the Triton kernel, for ``x [..., in_features]`` (raises for modules it cannot
    compute, see :func:`ineligible_reason`)."""
    reason = ineligible_reason(module)
    if reason is not None:
        raise ValueError(f"the cuda_triton path cannot compute this QuantLinear: {reason}")
    y = weight_only_matmul(
        x.reshape(-1, x.shape[-1]),
        module.weight.detach(),
        module.weight_scale.detach(),
        bits=module.bits,
        in_features=module.in_features,
        group_size=module.group_size,
        minimum=None if module.weight_min is None else module.weight_min.detach(),
        zero=None if getattr(module, "weight_zero", None) is None else module.weight_zero.detach(),
        bias=None if module.bias is None else module.bias.detach(),
        split_k=split_k,
    )
    return y.reshape(*x.shape[:-1], module.out_features)
