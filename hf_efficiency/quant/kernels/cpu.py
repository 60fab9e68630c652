"""The fused CPU kernel of `QuantLinear` (``csrc/cpu_kernels.cpp``): build once, cache, lay out, run.

The C++ source is compiled with ``torch.utils.cpp_extension`` the first time a quantized layer runs on
an x86 CPU with AVX2 (about a minute on 2 cores), into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes load the cached
library in well under a second. When no compiler is present, the build fails, the CPU lacks AVX2 or
``HF_EFFICIENCY_CPU_KERNEL=0`` is set, `QuantLinear` keeps the pure-torch ``dequant`` path, with
one warning saying why.

The kernel reads our packed words in place for 8-, 4- and 2-bit codes (no second copy of the
weight); 3-bit codes are repacked to 4 bits and 5/6-bit codes to 8 bits once per module (held
beside the module, not saved). Groups are whole blocks of 32 codes (group sizes 32, 64, ..., or per
channel) or groups of 16 codes (GGUF's Q6_K, Q3_K and Q2_K): then each 32-code block holds two groups and
the kernel scales its codes per 16-code half (adding the minimum) before the products, where the longer
groups sum codes times activations first and scale each group's sum once. Other group sizes keep the
``dequant`` path.

The kernel computes asymmetric groups as ``u * scale + minimum``. For modules with integer zero points
(``weight_zero``) the layout holds float32 copies of the scales and of the minima ``-zero * scale``
(``8 * out * G`` bytes, dropped with the layout): for 16-bit scales ``u * scale + (-zero * scale)`` is
exactly ``(u - zero) * scale``, and it is the reference float32 de-quantization's own operation.

Same tensors, same input, same bits: the kernel reads every operand with unaligned loads in a fixed order, each
output row is summed by one thread whatever the split, and the ISA row (`vector_bits`) is read per call, so
neither buffer alignment, the thread count nor layouts cached earlier in the process change a result (the two
ISA rows differ from each other in the last bits). torch's own float matmuls are not alignment-blind:
`realign_float_tensors` moves a loaded model's memory-mapped float tensors to aligned memory.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.utils import logging

from ..core.packing import pack, unpack

if TYPE_CHECKING:
    from ..modules.linear import QuantLinear

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
#: activation rows up to which the fused kernel runs; larger batches (prefill) de-quantize with the
#: kernel's own unpacking and call the float GEMM (measured crossover: benchmarks/results/quant_kernels.md)
FUSED_MAX_ROWS = 16
KERNEL_BITS = {8: 8, 4: 4, 2: 2, 3: 4, 5: 8, 6: 8}

_STATE: dict[str, object] = {}


def _supported_cpu() -> str | None:
    """Why this CPU cannot run the kernel, or ``None``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (torch reports {capability})"
    return None


VECTOR_BITS = (256, 512)


def vector_bits() -> int:
    """512 (AVX-512F rows) when torch reports AVX512 for this CPU, else 256 (AVX2);
    ``HF_EFFICIENCY_CPU_VECTOR_BITS=256`` forces the AVX2 rows.

    Read on every fused call, never kept in a module's cached layout: the two rows sum in different orders, so
    a layout that remembered the row of the moment it was built would give other bits than a fresh process
    for the same tensors and input (the variable read the same either way)."""
    forced = os.environ.get("HF_EFFICIENCY_CPU_VECTOR_BITS")
    if forced:
        if forced not in ("256", "512"):
            raise ValueError(f"HF_EFFICIENCY_CPU_VECTOR_BITS={forced!r} is not allowed; allowed values: 256, 512")
        return int(forced)
    detected = _STATE.get("vector_bits")
    if detected is None:
        detected = _STATE["vector_bits"] = 512 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 256
    return detected  # type: ignore[return-value]


def expected_available() -> bool:
    """Whether the kernel is (or would be, once built) usable here, without building it."""
    if "module" in _STATE:
        return _STATE["module"] is not None
    if os.environ.get("HF_EFFICIENCY_CPU_KERNEL", "1") == "0" or _supported_cpu() is not None:
        return False
    import shutil

    return shutil.which(os.environ.get("CXX", "c++")) is not None


def extension():
    """The compiled extension module, building it on first use; ``None`` when unavailable."""
    if "module" in _STATE:
        return _STATE["module"]
    reason = None
    if os.environ.get("HF_EFFICIENCY_CPU_KERNEL", "1") == "0":
        reason = "HF_EFFICIENCY_CPU_KERNEL=0"
    else:
        reason = _supported_cpu()
    module = None
    if reason is None:
        try:
            module = _build()
        except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
            reason = (
                f"building it failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e})"
            )
    if reason is not None:
        logger.warning(
            f"hf-efficiency's fused CPU kernel is not used: {reason}; quantized layers de-quantize per "
            "call instead (slower decoding)"
        )
    _STATE["module"] = module
    _STATE["reason"] = reason
    return module


def unavailable_reason() -> str | None:
    extension()
    return _STATE.get("reason")  # type: ignore[return-value]


def _build():
    from torch.utils.cpp_extension import load

    # no implicit FMA: dequant stays bit-exact. -fopenmp: at::parallel_for is a header template that runs its
    # loop serially unless the extension itself is compiled with OpenMP (torch's own build uses OpenMP)
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    name = f"hf_efficiency_cpu_kernels_{digest}"
    logger.info(f"loading hf-efficiency's CPU kernel {name} (compiled once, about a minute on 2 cores)")
    module = load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    _register_fake()
    return module


def _register_fake() -> None:
    """The shape function of ``torch.ops.hf_efficiency.quant_gemm`` (defined and implemented in C++ by the
    extension), which ``torch.compile`` traces with: ``[M, N]`` float32 for ``x [M, K]`` and ``q [N, ...]``."""

    @torch.library.register_fake("hf_efficiency::quant_gemm")
    def _(q, scale, minimum, bits, offset, group, x, vector_bits, bias):
        return x.new_empty(x.shape[0], q.shape[0])


@dataclass
class CpuLayout:
    """What the kernel reads for one module."""

    q: torch.Tensor  # uint8 view of the packed codes (8/4/2-bit words in place, or a repacked copy)
    copied: bool  # whether ``q`` is a repacked copy (3-, 5- and 6-bit codes) held beside the module
    bits: int  # width of the codes in ``q``: 8, 4 or 2
    offset: int
    group: int  # codes per group (16 or a multiple of 32)
    padded_in: int  # in_features rounded up to 32
    scale: torch.Tensor  # the module's own tensors (any change of them drops the cached layout), or float32
    minimum: torch.Tensor | None  # copies (scale, -zero * scale) for integer zero points
    perm: torch.Tensor | None  # int64 act-order permutation
    gemm: object  # the extension's quant_gemm


def eligible(module: QuantLinear) -> bool:
    """Whether the fused kernel can compute ``module``: no outliers, no int8 activations, groups of whole
    32-code blocks or of 16 codes (two per block), a width it reads."""
    g = module.group_size
    return (
        not getattr(module, "outliers", 0)
        and not getattr(module, "act_mode", None)
        and module.bits in KERNEL_BITS
        and (g is None or g % 32 == 0 or g == 16)
    )


def layout(module: QuantLinear) -> CpuLayout:
    """The kernel's view of ``module``'s tensors (no copy for 8, 4 and 2 bits)."""
    n = module.in_features
    padded = -(-n // 32) * 32
    bits = KERNEL_BITS[module.bits]
    if bits == module.bits:
        words = module.weight.detach()
    else:
        words = pack(unpack(module.weight.detach(), module.bits, n), bits)
    q = words.contiguous().view(torch.uint8)
    offset = 2 ** (module.bits - 1) if module.symmetric else 0
    group = padded if module.group_size is None else module.group_size
    zero = getattr(module, "weight_zero", None)
    if zero is None:
        scale = module.weight_scale.detach()
        minimum = None if module.weight_min is None else module.weight_min.detach()
    else:  # float32 copies: u * s + (-z * s), the reference float32 de-quantization
        scale = module.weight_scale.detach().float().contiguous()
        minimum = (-(zero.detach().float() * scale)).contiguous()
    return CpuLayout(
        q=q,
        copied=bits != module.bits,
        bits=bits,
        offset=offset,
        group=group,
        padded_in=padded,
        scale=scale,
        minimum=minimum,
        perm=None if module.weight_perm is None else module.weight_perm.detach().long(),
        gemm=extension().quant_gemm,
    )


def layout_bytes(module: QuantLinear) -> int:
    """Bytes the kernel layout adds beside the module: a repacked copy for 3-, 5- and 6-bit codes, and
    float32 scales and minima for integer zero points."""
    bits = KERNEL_BITS.get(module.bits, module.bits)
    codes = 0 if bits == module.bits else module.out_features * (-(-module.in_features // 32) * 32) * bits // 8
    zero = getattr(module, "weight_zero", None)
    return codes + (0 if zero is None else 2 * 4 * zero.numel())


def dequantize(module: QuantLinear, lay: CpuLayout) -> torch.Tensor:
    """The float32 weight ``[out, in]`` in stored column order, bit-identical to the reference
    de-quantization (same operations, no fused multiply-add), unpacked by the kernel."""
    return extension().quant_dequant(
        lay.q, lay.scale, lay.minimum, lay.bits, lay.offset, lay.group, lay.padded_in, module.in_features
    )


def forward(module: QuantLinear, x: torch.Tensor, lay: CpuLayout) -> torch.Tensor:
    """``module(x)`` through the kernel (few rows) or the kernel's de-quantization plus float GEMM. Kept lean:
    it runs for every linear of every decoded token."""
    n = module.in_features
    x2 = x.reshape(-1, n)
    if lay.perm is not None:
        x2 = x2.index_select(1, lay.perm)
    bias = module.bias
    if x2.shape[0] <= FUSED_MAX_ROWS:
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if lay.padded_in != n:
            x2 = F.pad(x2, (0, lay.padded_in - n))
        fused_bias = bias is not None and bias.dtype == torch.float32
        # traced (torch.compile): the operator the extension registers; eager: its Python binding (cheaper per call)
        gemm = torch.ops.hf_efficiency.quant_gemm if torch.compiler.is_compiling() else lay.gemm
        y = gemm(
            lay.q,
            lay.scale,
            lay.minimum,
            lay.bits,
            lay.offset,
            lay.group,
            x2.contiguous(),
            vector_bits(),  # per call (see vector_bits)
            bias.detach() if fused_bias else None,
        )
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None and not fused_bias:
            y = y + bias.to(y.dtype)
    else:
        w = dequantize(module, lay)
        y = F.linear(x2, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y.view(*x.shape[:-1], module.out_features)


#: the byte alignment torch's CPU allocator gives every tensor it allocates
ALIGNMENT = 64


def realign_float_tensors(model: torch.nn.Module, alignment: int = ALIGNMENT) -> int:
    """Copy every floating-point CPU parameter and buffer of ``model`` whose data does not start on an
    ``alignment``-byte boundary into a fresh (aligned) allocation; return how many were copied.

    The copy replaces the tensor's ``.data``, so tied weights (an ``lm_head`` sharing the embedding) stay one
    tensor. For model loading (quantizing and pre-quantized alike): safetensors checkpoints are
    memory-mapped: a loaded tensor starts where its bytes lie in the file (8-byte aligned at best, shifted by
    the length of the file's header), and torch's CPU BLAS (MKL) sums a float matmul in an order that
    depends on its operands' alignment (a one-row ``F.linear`` on a weight at 8 mod 16 bytes rounds other
    than on the same weight 16-byte aligned). The float layers of a quantized model (above all a tied
    ``lm_head``) then gave other bits in the process that quantized it (tensors of the float checkpoint) than
    in one loading our checkpoint (another header, other offsets). The fused kernel reads its own tensors at
    any alignment alike; packed integer tensors are left where they are (no copy of the bulk of the model).
    """
    copied = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for t in store.values():
                if (
                    t is None
                    or not t.is_floating_point()
                    or t.device.type != "cpu"
                    or t.numel() == 0
                    or t.data_ptr() % alignment == 0  # also the second sight of a tied tensor, copied already
                ):
                    continue
                t.data = t.data.clone()
                copied += 1
    return copied
