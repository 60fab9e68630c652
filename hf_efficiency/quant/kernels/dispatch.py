"""Device-specific matmul paths for `QuantLinear` (the only module with device-specific code).

Paths, chosen per call by :func:`select_path`:

* ``"dequant"`` (any device, the reference): unpack codes, rebuild the float weight in the
  activation dtype, ``F.linear``.
* ``"cpu_fused"`` (float32 activations on x86 CPUs with AVX2, the default there): the C++ kernel of
  :mod:`.cpu_kernel` reads the packed codes in place and fuses unpacking, scaling and the matrix-vector product for up to
  ``FUSED_MAX_ROWS`` activation rows (decoding, speculative verification, small batches); larger
  inputs (prefill) de-quantize with the same kernel's unpacking and call the float GEMM. Modules it
  cannot compute (outliers, groups neither whole 32-code blocks nor 16 codes) and CPUs without AVX2 or a
  compiler take ``"dequant"``, as do bfloat16/float16 activations (the reference computes those in their
  own dtype, and QAT and bf16 checkpoints are checked bit for bit against it). Under ``torch.compile`` the
  kernel is the operator ``torch.ops.hf_efficiency.quant_gemm`` (no graph break; see `hf_efficiency.decoding`).
* ``"cuda_int8"``: ``torch._weight_int8pack_mm`` for symmetric 8-bit per-channel weights with
  fp16/bf16 activations on CUDA, up to ``CUDA_KERNEL_MAX_ROWS`` activation rows (as ``cuda_int4``);
  larger inputs take ``dequant`` (one de-quantization, one float matmul).
* ``"cuda_int4"``: torch's tinygemm ``torch._weight_int4pack_mm`` for 4-bit group-wise weights
  (groups 32-256 dividing ``in_features``) with bf16 activations on CUDA.
* ``"cuda_triton"``: the Triton kernel of :mod:`.triton_kernels` (when triton imports) for the other 4- and
  8-bit modules on CUDA up to ``CUDA_KERNEL_MAX_ROWS`` rows: per-channel or groups of multiples of 32, every
  grid (symmetric, float minimum, integer zero point), fp16/bf16/fp32 activations; it reads the packed words in
  place (no layout beside the module). Modules the torch kernels above take keep them;
  ``HF_EFFICIENCY_KERNEL=cuda_triton`` forces it (then a module it cannot compute raises).

* ``"w8a8"`` (modules with int8 activations, any device): activations are quantized to int8
  per token (dynamic) or with the calibrated ``input_scale`` (static), then
  ``torch._int_mm`` accumulates in int32 (exact) and the product of scales rescales. On CPU this
  was measured fastest among the exact int8 paths (benchmarks/results/w8a8_cpu.md);
  ``HF_EFFICIENCY_W8A8_PATH`` picks another of :data:`~.activation.INT8_LINEAR_PATHS`
  (same numbers, different speed).

Outliers (``weight_outlier_*``) are only applied by the ``dequant`` path, so modules that keep them always
take it. Act-order column permutations (``weight_perm``) are applied by ``dequant`` and by ``cpu_fused``
(which permutes the input); on CUDA such modules take ``dequant``.

Training through a frozen quantized layer (QLoRA, BitFit on its bias, adapters, prompt tuning) takes
``"dequant_autograd"`` whenever the input or the bias needs a gradient: the forward dequantizes, and the
backward dequantizes again instead of keeping the float weight alive between forward and backward
(what ``F.linear`` on a dequantized weight would save: a float copy of every layer's weight). Activations
then cost what they cost with a float base, as bitsandbytes' 4-bit layers do.

Kernel layouts are built once per module and cached beside it, outside the state dict (through
`QuantLinear.kernel_layout`, which drops them whenever a tensor of the module changes), so the saved
format never changes. ``HF_EFFICIENCY_KERNEL=dequant`` forces the reference path.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.packing import unpack
from ..core.scheme import apply_outliers, dequantize_codes, unpermute_columns

if TYPE_CHECKING:
    from ..modules.linear import QuantLinear

INT4_GROUP_SIZES = (32, 64, 128, 256)
KERNEL_PATHS = ("dequant", "cpu_fused", "cuda_int8", "cuda_int4", "w8a8", "cuda_triton")
INT4_INNER_K_TILES = 8
#: CUDA: activation rows up to which the int8/int4 weight-only kernels run; above (prefill) the weight is
#: de-quantized once and one float matmul runs (tinygemm int4 measured 20x slower than bf16 at 512 rows on
#: an H200, benchmarks/results/gpu_check.md)
CUDA_KERNEL_MAX_ROWS = 16


def select_path(module: "QuantLinear", x: torch.Tensor) -> str:
    """Name of the matmul path used for ``module(x)`` (builds the CPU kernel on first use)."""
    shape = getattr(x, "shape", (1, 1))
    rows = 1
    for d in tuple(shape)[:-1]:
        rows *= int(d)
    path = path_for(module, x.device.type, x.dtype, rows)
    if path == "cpu_fused" and not os.environ.get("HF_EFFICIENCY_KERNEL"):
        from . import cpu as cpu_kernel

        if cpu_kernel.extension() is None:
            return "dequant"
    return path


def path_for(module: "QuantLinear", device_type: str, dtype: torch.dtype, rows: int = 1) -> str:
    """Name of the matmul path for inputs of ``dtype`` on ``device_type`` (also used by the
    memory estimator, which has no real input: it never builds the CPU kernel)."""
    if getattr(module, "act_mode", None):
        return "w8a8"  # int8 activations change the numbers: never silently swap the path
    forced = os.environ.get("HF_EFFICIENCY_KERNEL")
    if forced:
        return forced
    if device_type == "cpu":
        from . import cpu as cpu_kernel

        fused = dtype == torch.float32 and cpu_kernel.eligible(module) and cpu_kernel.expected_available()
        return "cpu_fused" if fused else "dequant"
    if (
        device_type != "cuda"
        or getattr(module, "outliers", 0)
        or getattr(module, "weight_perm", None) is not None
        or rows > CUDA_KERNEL_MAX_ROWS
    ):
        return "dequant"
    if module.bits == 8 and module.symmetric and module.group_size is None and dtype in (torch.float16, torch.bfloat16):
        return "cuda_int8"
    if (
        module.bits == 4
        and dtype == torch.bfloat16
        and module.group_size in INT4_GROUP_SIZES
        and module.in_features % module.group_size == 0
        and module.in_features % (16 * INT4_INNER_K_TILES) == 0
        and module.out_features % 8 == 0
    ):
        return "cuda_int4"
    if _triton_serves(module, dtype):
        return "cuda_triton"
    return "dequant"


def _triton_serves(module: "QuantLinear", dtype: torch.dtype) -> bool:
    """Whether the Triton kernel computes ``module`` for ``dtype`` activations on CUDA (triton importable; the
    kernel reads the module's format). Imports triton on the first CUDA query, builds nothing."""
    from . import triton_kernels

    return (
        dtype in triton_kernels.ACTIVATION_DTYPES
        and triton_kernels.eligible(module)
        and triton_kernels.triton_available()
    )


def dequantize_weight(module: "QuantLinear", dtype: torch.dtype) -> torch.Tensor:
    """The module's float weight ``[out, in]`` in ``dtype`` (float32 on CPU: unpacked by the fused kernel's
    de-quantization, bit-identical to the torch computation and several times faster)."""
    if dtype == torch.float32 and module.weight.device.type == "cpu" and _fused_cpu(module):
        from . import cpu as cpu_kernel

        w = cpu_kernel.dequantize(module, module.kernel_layout("cpu", lambda: cpu_kernel.layout(module)))
        return unpermute_columns(w, getattr(module, "weight_perm", None))
    codes = unpack(module.weight, module.bits, module.in_features)
    w = dequantize_codes(
        codes,
        module.weight_scale,
        module.weight_min,
        module.bits,
        module.group_size,
        dtype,
        zero=getattr(module, "weight_zero", None),
    )
    w = unpermute_columns(w, getattr(module, "weight_perm", None))
    return apply_outliers(w, module.weight_outlier_index, module.weight_outlier_value)


def _fused_cpu(module: "QuantLinear") -> bool:
    if os.environ.get("HF_EFFICIENCY_KERNEL") or not hasattr(module, "weight_scale"):
        return False
    from . import cpu as cpu_kernel

    return cpu_kernel.eligible(module) and cpu_kernel.extension() is not None


def int8_kernel_layout(module: "QuantLinear", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 weight ``[out, in]`` and per-channel scales for ``_weight_int8pack_mm``."""
    codes = unpack(module.weight, 8, module.in_features).to(torch.int16) - 128
    return codes.to(torch.int8).contiguous(), module.weight_scale[:, 0].to(dtype).contiguous()


def int4_scales_and_zeros(module: "QuantLinear", dtype: torch.dtype) -> torch.Tensor:
    """tinygemm's ``[G, out, 2]`` (scale, zero) with ``w = (u - 8) * scale + zero`` (integer zero points
    ``z``: the minimum ``-z * scale``, so ``zero = (8 - z) * scale``)."""
    scale = module.weight_scale.float()
    weight_zero = getattr(module, "weight_zero", None)
    if weight_zero is not None:
        zero = -(weight_zero.float() * scale) + 8 * scale
    elif module.weight_min is None:
        zero = torch.zeros_like(scale)
    else:
        zero = module.weight_min.float() + 8 * scale
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_kernel_layout(module: "QuantLinear") -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm-packed weight and scales/zeros for ``_weight_int4pack_mm`` (CUDA)."""
    codes = unpack(module.weight, 4, module.in_features).to(torch.uint8)
    packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, INT4_INNER_K_TILES)
    return weight, int4_scales_and_zeros(module, torch.bfloat16)


class _DequantLinear(torch.autograd.Function):
    """``F.linear(x, W_hat, b)`` that saves nothing for backward: the weight is dequantized again there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, module: "QuantLinear") -> torch.Tensor:
        ctx.module = module
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, dequantize_weight(module, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_weight(ctx.module, grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_b, None


def _needs_grad(module: "QuantLinear", x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (module.bias is not None and module.bias.requires_grad))


def quant_linear_forward(module: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """``x @ W_hat.T + b`` through the path :func:`select_path` picks (``dequant_autograd`` in training)."""
    lay = module.kernel_layout("cpu")
    traced = torch.compiler.is_compiling()  # a compiled decode step: no env reads, no attribute writes
    if (
        lay is not None
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not _needs_grad(module, x)
        and (traced or not os.environ.get("HF_EFFICIENCY_KERNEL"))
    ):  # decoding: the path was chosen on an earlier (eager) call
        from . import cpu as cpu_kernel

        if not traced:
            module.last_path = "cpu_fused"
        return cpu_kernel.forward(module, x, lay)
    path = select_path(module, x)
    if path not in KERNEL_PATHS:
        raise ValueError(f"unknown kernel path {path!r}; allowed values: {', '.join(KERNEL_PATHS)}")
    if _needs_grad(module, x):
        module.last_path = "dequant_autograd"
        return _DequantLinear.apply(x, module.bias, module)
    module.last_path = path
    if path == "cuda_int8":
        w, s = module.kernel_layout(f"int8-{x.dtype}", lambda: int8_kernel_layout(module, x.dtype))
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, s)
        out = out.reshape(*x.shape[:-1], module.out_features)
    elif path == "cuda_int4":
        w, sz = module.kernel_layout("int4", lambda: int4_kernel_layout(module))
        out = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), w, module.group_size, sz)
        out = out.reshape(*x.shape[:-1], module.out_features)
    elif path == "cuda_triton":
        from . import triton_kernels

        return triton_kernels.forward(module, x)  # bias added in the kernel
    elif path == "dequant":
        bias = None if module.bias is None else module.bias.to(x.dtype)  # as the fused path: a bf16 bias, fp32 x
        return F.linear(x, dequantize_weight(module, x.dtype), bias)
    elif path == "cpu_fused":
        from . import cpu as cpu_kernel

        return cpu_kernel.forward(module, x, module.kernel_layout("cpu", lambda: cpu_kernel.layout(module)))
    else:  # w8a8
        return w8a8_forward(module, x)
    if module.bias is not None:
        out = out + module.bias.to(out.dtype)
    return out


def w8a8_path() -> str:
    """The int8 matmul used by W8A8 modules (``HF_EFFICIENCY_W8A8_PATH``, default ``int_mm``)."""
    from ..core.activation import INT8_LINEAR_PATHS

    path = os.environ.get("HF_EFFICIENCY_W8A8_PATH", "int_mm")
    if path not in INT8_LINEAR_PATHS:
        raise ValueError(
            f"HF_EFFICIENCY_W8A8_PATH={path!r} is not allowed; allowed values: {', '.join(INT8_LINEAR_PATHS)}"
        )
    return path


def w8a8_forward(module: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """Int8 activations x int8 weights with int32 accumulation (see module docstring)."""
    from ..core import activation

    path = w8a8_path()

    def build():
        q_w, s_w = int8_kernel_layout(module, torch.float32)
        return q_w, s_w, activation.prepare_weight(q_w, s_w, path)

    q_w, s_w, prepared = module.kernel_layout(f"w8a8-{path}", build)
    if module.act_mode == "static":
        s_x = module.input_scale.float()
        q_x = activation.quantize_static(x, s_x)
    else:
        q_x, s_x = activation.quantize_per_token(x)
    return activation.int8_linear(q_x, s_x, q_w, s_w, module.bias, path=path, out_dtype=x.dtype, prepared=prepared)
