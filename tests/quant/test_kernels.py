"""Kernel dispatch of QuantLinear: path choice, kernel layouts checked on CPU, GPU parity when present."""

from types import SimpleNamespace

import pytest
import torch

from hf_efficiency.quant.kernels import dispatch as kernels
from hf_efficiency.quant.kernels.triton_kernels import triton_available
from hf_efficiency.quant.modules.linear import QuantLinear

#: the path of formats the torch CUDA kernels refuse: the Triton kernel where triton imports (tests/quant/test_triton_kernels.py)
TRITON = "cuda_triton" if triton_available() else "dequant"


def _q(bits, group, sym, in_features=256, out_features=64, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features)
    return lin, QuantLinear.from_linear(lin, bits=bits, group_size=group, symmetric=sym)


def _x(device="cuda", dtype=torch.bfloat16, rows=1):
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(rows, 256))


@pytest.mark.parametrize(
    "bits,group,sym,in_f,out_f,dtype,expected",
    [
        (8, None, True, 256, 64, torch.bfloat16, "cuda_int8"),
        (8, None, True, 256, 64, torch.float16, "cuda_int8"),
        (8, None, True, 256, 64, torch.float32, TRITON),  # no fp32 torch int8 kernel
        (8, 64, True, 256, 64, torch.bfloat16, TRITON),  # grouped int8: no torch kernel
        (8, None, False, 256, 64, torch.bfloat16, TRITON),  # asymmetric int8: no torch kernel
        (4, 64, False, 256, 64, torch.bfloat16, "cuda_int4"),
        (4, 128, True, 256, 64, torch.bfloat16, "cuda_int4"),
        (4, 64, False, 256, 64, torch.float16, TRITON),  # tinygemm wants bf16
        (4, 64, False, 96, 64, torch.bfloat16, TRITON),  # in_features not a multiple of 128
        (4, 64, False, 256, 60, torch.bfloat16, TRITON),  # out_features not a multiple of 8
        (4, None, False, 256, 64, torch.bfloat16, TRITON),
        (3, 64, False, 256, 64, torch.bfloat16, "dequant"),  # no kernel reads 3-bit codes on CUDA
    ],
)
def test_select_path_on_cuda(bits, group, sym, in_f, out_f, dtype, expected):
    _, q = _q(bits, group, sym, in_f, out_f)
    assert kernels.select_path(q, _x("cuda", dtype)) == expected
    # prefill: more than CUDA_KERNEL_MAX_ROWS rows de-quantize once and run one float matmul
    assert kernels.select_path(q, _x("cuda", dtype, rows=17)) == "dequant"
    assert kernels.select_path(q, _x("cuda", dtype, rows=16)) == expected


def test_training_path_saves_no_weight_and_gives_the_float_gradients():
    lin, q = _q(4, 64, False)
    q.bias.requires_grad_(True)
    x = torch.randn(3, 5, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert q.last_path == "dequant_autograd" and sum(saved) == 0  # F.linear would keep the 64 KiB weight
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = q.bias.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, q.dequantize_weight(), b_ref)
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5) and torch.allclose(q.bias.grad, b_ref.grad, atol=1e-5)
    with torch.no_grad():
        q(x)
    assert q.last_path == "cpu_fused"


def test_cpu_takes_fused_path_and_env_override(monkeypatch):
    lin, q = _q(8, None, True)
    x = torch.randn(2, 256)
    assert kernels.select_path(q, x) == "cpu_fused"  # x86-64 with AVX2 and a compiler, as CI
    ref = torch.nn.functional.linear(x, q.dequantize_weight(), lin.bias)
    with torch.no_grad():
        y = q(x)
    assert q.last_path == "cpu_fused"
    assert torch.allclose(y, ref, atol=1e-5)
    monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "dequant")
    with torch.no_grad():
        y = q(x)
    assert q.last_path == "dequant"
    assert torch.allclose(y, ref, atol=1e-6)
    monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "nonsense")
    with pytest.raises(
        ValueError, match="unknown kernel path 'nonsense'; allowed values: dequant, cpu_fused, cuda_int8"
    ):
        q(x)


def test_int8_kernel_layout_matches_reference_on_cpu():
    # torch's _weight_int8pack_mm also runs on CPU: the same layout code feeds the CUDA kernel.
    lin, q = _q(8, None, True)
    w, s = kernels.int8_kernel_layout(q, torch.bfloat16)
    assert w.dtype == torch.int8 and s.shape == (64,)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), q.dequantize_weight(torch.float32))
    out = torch.ops.aten._weight_int8pack_mm(x, w, s).float()
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("sym", [False, True])
def test_int4_scales_and_zeros_convention_on_cpu(sym):
    # tinygemm computes (u - 8) * scale + zero; check our (scale, zero) with torch's CPU variant of the kernel.
    lin, q = _q(4, 64, sym)
    codes = kernels.unpack(q.weight, 4, 256).to(torch.int32)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, kernels.INT4_INNER_K_TILES)
    sz = kernels.int4_scales_and_zeros(q, torch.bfloat16)
    assert sz.shape == (4, 64, 2)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), q.dequantize_weight(torch.float32))
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 64, sz).float()
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_device_move_drops_cached_kernel_layout():
    _, q = _q(8, None, True)
    assert q.kernel_layout("int8", lambda: "stale") == "stale"
    q.to(torch.float32)
    assert q.kernel_layout("int8") is None


@pytest.mark.parametrize("forced", ["dequant", None])
def test_bias_of_another_dtype_than_the_input_on_every_cpu_path(monkeypatch, forced):
    lin, q = _q(4, 32, False)
    q.set_storage_dtypes({"bias": torch.bfloat16})
    q.requires_grad_(False)  # inference: the dequant path, not the autograd one
    if forced:
        monkeypatch.setenv("HF_EFFICIENCY_KERNEL", forced)
    x = torch.randn(3, 256)
    out = q(x)
    ref = torch.nn.functional.linear(x, q.dequantize_weight(torch.float32), q.bias.float())
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "bits,group,sym,dtype,path",
    [(8, None, True, torch.bfloat16, "cuda_int8"), (4, 128, False, torch.bfloat16, "cuda_int4")],
)
def test_cuda_kernels_match_cpu_reference(bits, group, sym, dtype, path):
    lin, q = _q(bits, group, sym, 512, 256)
    x = torch.randn(5, 512)
    ref = torch.nn.functional.linear(x, q.dequantize_weight(torch.float32), lin.bias)
    qc = q.cuda()
    out = qc(x.cuda().to(dtype))
    assert qc.last_path == path
    assert (out.float().cpu() - ref).abs().max() < 0.02 * ref.abs().max()
