"""The fused CPU kernel (`hf_efficiency/quant/csrc/cpu_kernels.cpp`): every width, group size (groups of 16
codes, GGUF's Q6_K/Q3_K/Q2_K, included), scale dtype, odd sizes and row counts against the reference path;
bit-exact de-quantization; dispatch and fallback."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from hf_efficiency.quant.core.packing import pack
from hf_efficiency.quant.core.scheme import QuantizedWeight, num_groups
from hf_efficiency.quant.kernels import cpu as cpu_kernel
from hf_efficiency.quant.kernels import dispatch as kernels
from hf_efficiency.quant.modules.linear import QuantLinear

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernel.extension() is not None, cpu_kernel.unavailable_reason()  # CI machines are x86-64 + AVX2


def _module(bits, group, sym, n, out=40, scale_dtype=torch.float16, bias=True, seed=0, zero=False):
    """A QuantLinear with random codes over the full range and random scales/minima (incl. negative), or with
    random integer zero points (``zero=True``, asymmetric)."""
    g = torch.Generator().manual_seed(seed)
    extra = {"zero_point": "integer"} if zero else {}
    m = QuantLinear(n, out, bias, bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype, **extra)
    groups = num_groups(n, group)
    q = QuantizedWeight(
        packed=pack(torch.randint(0, 2**bits, (out, n), generator=g), bits),
        scale=(torch.rand(out, groups, generator=g) * 0.02 + 1e-3).to(scale_dtype),
        minimum=None if sym or zero else (torch.randn(out, groups, generator=g) * 0.05).to(scale_dtype),
        bits=bits,
        group_size=group,
        in_features=n,
        zero=torch.randint(0, 2**bits, (out, groups), generator=g).to(torch.uint8) if zero else None,
    )
    m.load_quantized(q)
    if bias:
        m.bias.data = torch.randn(out, generator=g)
    return m


def _torch_weight(m):
    """The pure-torch de-quantization (the reference path), whatever the kernel does."""
    os.environ["HF_EFFICIENCY_KERNEL"] = "dequant"
    try:
        return m.dequantize_weight(torch.float32)
    finally:
        del os.environ["HF_EFFICIENCY_KERNEL"]


CASES = [  # (bits, group, symmetric, in_features)
    *itertools.product([2, 3, 4, 5, 6, 8], [None, 32, 64, 128], [True, False], [96]),
    (4, 128, False, 576),
    (4, 64, True, 576),
    (8, None, True, 1536),
    (2, 32, False, 100),
    (3, 96, True, 200),
    (4, None, False, 33),
    (8, 32, False, 31),
    (4, 256, True, 300),
]


VECTOR_BITS = [256] + ([512] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])


@pytest.mark.parametrize("vector_bits", VECTOR_BITS)
@pytest.mark.parametrize("bits,group,sym,n", CASES)
def test_fused_kernel_matches_reference_for_every_row_count(bits, group, sym, n, vector_bits, monkeypatch):
    monkeypatch.setenv("HF_EFFICIENCY_CPU_VECTOR_BITS", str(vector_bits))  # AVX2 rows, and AVX-512 where present
    m = _module(bits, group, sym, n, seed=bits * 7 + n)
    w = _torch_weight(m)
    lay = cpu_kernel.layout(m)
    assert lay.copied == (bits in (3, 5, 6))
    for rows in (1, 2, 3, 5, 8, 9, 16, 17, 40):  # fused chunks of 8/4/2/1 rows, then de-quantize + GEMM
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        ref = torch.nn.functional.linear(x, w, m.bias)
        y = cpu_kernel.forward(m, x, lay)
        bound = (x.abs() @ w.abs().T).max()  # the size of the sums: float rounding is relative to it
        if rows > cpu_kernel.FUSED_MAX_ROWS:
            assert torch.equal(y, ref)  # bit-identical weight, same GEMM
        else:
            assert (y - ref).abs().max() <= 2e-6 * bound, (rows, (y - ref).abs().max() / bound)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, False), (4, True), (2, False), (3, False), (6, True)])
def test_kernel_dequantization_is_bit_identical_to_torch(bits, sym, scale_dtype):
    m = _module(bits, 64, sym, 200, scale_dtype=scale_dtype, seed=bits)
    assert torch.equal(cpu_kernel.dequantize(m, cpu_kernel.layout(m)), _torch_weight(m))
    assert torch.equal(m.dequantize_weight(torch.float32), _torch_weight(m))  # QuantLinear takes the kernel


# groups of 16 codes (two per 32-code block): every width, the three grids (symmetric, float minimum,
# integer zero point), in_features whose last block holds two groups (256), one group and padding (112, 200:
# an odd number of groups) or part of one (72)
GRIDS = {"symmetric": (True, False), "minimum": (False, False), "zero point": (False, True)}
CASES16 = [
    (bits, grid, n)
    for bits, grid in itertools.product([2, 3, 4, 5, 6, 8], GRIDS)
    for n in ([200, 256] if bits in (4, 6) else [112, 200])
] + [(6, "symmetric", 72), (2, "minimum", 72), (3, "zero point", 72)]


@pytest.mark.parametrize("vector_bits", VECTOR_BITS)
@pytest.mark.parametrize("bits,grid,n", CASES16)
def test_groups_of_16_match_reference(bits, grid, n, vector_bits, monkeypatch):
    monkeypatch.setenv("HF_EFFICIENCY_CPU_VECTOR_BITS", str(vector_bits))
    sym, zero = GRIDS[grid]
    m = _module(bits, 16, sym, n, scale_dtype=torch.float32, seed=bits * 11 + n, zero=zero)
    assert cpu_kernel.eligible(m)
    w = _torch_weight(m)
    lay = cpu_kernel.layout(m)
    assert lay.group == 16 and lay.scale.shape[1] == num_groups(n, 16)
    for rows in (1, 3, 8, 16, 17):  # 17: more than FUSED_MAX_ROWS, de-quantize + GEMM
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        ref = torch.nn.functional.linear(x, w, m.bias)
        y = cpu_kernel.forward(m, x, lay)
        bound = (x.abs() @ w.abs().T).max()
        if rows > cpu_kernel.FUSED_MAX_ROWS:
            assert torch.equal(y, ref)
        else:
            assert (y - ref).abs().max() <= 2e-6 * bound, (rows, (y - ref).abs().max() / bound)
    with torch.no_grad():
        m(torch.randn(1, 2, n))
    assert m.last_path == "cpu_fused"


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_groups_of_16_dequantization_is_bit_identical_to_torch(bits, grid, scale_dtype):
    sym, zero = GRIDS[grid]
    for n in (200, 256):  # odd and even number of groups
        m = _module(bits, 16, sym, n, scale_dtype=scale_dtype, seed=bits + n, zero=zero)
        assert torch.equal(cpu_kernel.dequantize(m, cpu_kernel.layout(m)), _torch_weight(m))
        assert torch.equal(m.dequantize_weight(torch.float32), _torch_weight(m))


def test_kernel_rejects_a_scale_of_the_wrong_group_count():
    m = _module(6, 16, True, 200, scale_dtype=torch.float32)  # 13 groups
    lay = cpu_kernel.layout(m)
    x = torch.randn(1, lay.padded_in)
    for groups in (12, 15):  # 13 and 14 (padding half) are allowed
        with pytest.raises(RuntimeError, match=r"scale must be \[N, ceil\(K/gs\)\]"):
            lay.gemm(lay.q, lay.scale[:, :1].repeat(1, groups).contiguous(), None, 8, 32, 16, x, 256, None)
    with pytest.raises(RuntimeError, match="group size 16 or a multiple of 32"):
        lay.gemm(lay.q, lay.scale, None, 8, 32, 48, x, 256, None)


def _write_k_quant_gguf(path):
    """A 1-layer Llama GGUF (hidden 256) whose linears are all Q6_K, Q3_K or Q2_K (random valid blocks)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    hidden, ffn, vocab = 256, 512, 32
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (w.add_block_count, 1),
        (w.add_context_length, 64),
        (w.add_embedding_length, hidden),
        (w.add_feed_forward_length, ffn),
        (w.add_head_count, 4),
        (w.add_head_count_kv, 2),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_rope_freq_base, 10000.0),
        (w.add_vocab_size, vocab),
    ]:
        add(value)

    def k_quant(name, type_name, rows, n):
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[T[type_name]]
        raw = rng.integers(0, 256, (rows * n // block_elems, block_bytes), dtype=np.uint8)
        for off in K_QUANT_F16_FIELDS[type_name]:  # sane super-block scales
            scales = (rng.standard_normal(len(raw)) * 0.002).astype(np.float16)
            raw[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
        w.add_tensor(name, raw.reshape(rows, -1), raw_dtype=T[type_name])

    w.add_tensor("token_embd.weight", (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    for part, (type_name, rows, n) in K_QUANT_LAYERS.items():
        k_quant(f"blk.0.{part}.weight", type_name, rows, n)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    k_quant("output.weight", "Q6_K", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


K_QUANT_F16_FIELDS = {"Q2_K": [80, 82], "Q3_K": [108], "Q6_K": [208]}
K_QUANT_LAYERS = {  # GGUF name: (type, rows, in_features); module: (bits, symmetric)
    "attn_q": ("Q6_K", 256, 256),
    "attn_k": ("Q3_K", 128, 256),
    "attn_v": ("Q2_K", 128, 256),
    "attn_output": ("Q6_K", 256, 256),
    "ffn_gate": ("Q2_K", 512, 256),
    "ffn_up": ("Q3_K", 512, 256),
    "ffn_down": ("Q6_K", 256, 512),
}


def test_gguf_k_quants_with_groups_of_16_take_the_fused_path(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from hf_efficiency.formats import load_gguf

    path = tmp_path / "k16.gguf"
    _write_k_quant_gguf(path)
    model = load_gguf(path).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 8  # 7 projections + the untied Q6_K head
    assert {(m.bits, m.group_size, m.symmetric) for m in linears.values()} == {
        (6, 16, True),
        (3, 16, True),
        (2, 16, False),
    }
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        fused = model(ids[:, :1]).logits
        assert {n: m.last_path for n, m in linears.items()} == {n: "cpu_fused" for n in linears}
        model(ids)  # 5 rows: fused too
        assert {m.last_path for m in linears.values()} == {"cpu_fused"}
        monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "dequant")
        ref = model(ids[:, :1]).logits
        assert {m.last_path for m in linears.values()} == {"dequant"}
    assert (fused - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_module_forward_dispatch_bias_dtypes_and_batch_shapes():
    m = _module(4, 32, False, 128)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = m(x)
    assert m.last_path == "cpu_fused" and y.shape == (2, 3, 40)
    ref = torch.nn.functional.linear(x, _torch_weight(m), m.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    nobias = _module(4, 32, False, 128, bias=False)
    with torch.no_grad():
        yb = nobias(x.bfloat16())  # bf16 activations: the reference path, in bf16 as before
    assert nobias.last_path == "dequant" and yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), torch.nn.functional.linear(x, _torch_weight(nobias)), atol=0.05)
    with torch.no_grad():
        big = m(torch.randn(4, 8, 128))  # 32 rows: prefill path
    assert m.last_path == "cpu_fused" and big.shape == (4, 8, 40)


def test_act_order_permutation_is_applied_to_the_input():
    m = QuantLinear(96, 16, False, bits=4, group_size=32, symmetric=False, act_order=True)
    src = _module(4, 32, False, 96, out=16, bias=False)
    q = QuantizedWeight(
        src.weight.data,
        src.weight_scale.data,
        src.weight_min.data,
        4,
        32,
        96,
        perm=torch.randperm(96, generator=torch.Generator().manual_seed(3)).int(),
    )
    m.load_quantized(q)
    x = torch.randn(3, 96)
    ref = torch.nn.functional.linear(x, q.dequantize())  # q.dequantize() un-permutes the columns
    with torch.no_grad():
        y = m(x)
    assert m.last_path == "cpu_fused" and torch.allclose(y, ref, atol=1e-5)
    assert torch.equal(m.dequantize_weight(), q.dequantize())


def test_modules_the_kernel_cannot_compute_take_the_reference_path():
    groups_of_48 = QuantLinear(96, 8, True, bits=6, group_size=48, symmetric=True)  # groups that split blocks
    groups_of_48.load_quantized(
        QuantizedWeight(pack(torch.randint(0, 64, (8, 96)), 6), torch.rand(8, 2).half(), None, 6, 48, 96)
    )
    with_outliers = QuantLinear(64, 8, True, bits=4, group_size=32, symmetric=False, outliers=1)
    for m in (groups_of_48, with_outliers):
        assert not cpu_kernel.eligible(m)
        assert kernels.select_path(m, torch.randn(1, 64)) == "dequant"


def test_vector_width_override_is_validated(monkeypatch):
    monkeypatch.setenv("HF_EFFICIENCY_CPU_VECTOR_BITS", "128")
    with pytest.raises(
        ValueError, match="HF_EFFICIENCY_CPU_VECTOR_BITS='128' is not allowed; allowed values: 256, 512"
    ):
        cpu_kernel.vector_bits()


def test_layout_bytes_count_only_repacked_widths():
    assert cpu_kernel.layout_bytes(_module(4, 32, False, 96)) == 0
    assert cpu_kernel.layout_bytes(_module(3, 32, False, 96)) == 40 * 96 // 2  # repacked to 4 bits
    assert cpu_kernel.layout_bytes(_module(6, 32, True, 100)) == 40 * 128  # to 8 bits, rows padded to 32


def test_no_kernel_falls_back_with_one_warning_in_a_fresh_process():
    code = (
        "import torch\n"
        "from transformers.utils import logging\n"
        "from hf_efficiency.quant.modules.linear import QuantLinear\n"
        "m = QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=32, symmetric=False)\n"
        "with torch.no_grad():\n    m(torch.randn(1, 64)); m(torch.randn(1, 64))\n"
        "print(m.last_path)\n"
    )
    env = dict(os.environ, HF_EFFICIENCY_CPU_KERNEL="0", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "dequant"
    assert r.stderr.count("fused CPU kernel is not used: HF_EFFICIENCY_CPU_KERNEL=0") == 1


def test_estimator_never_builds_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_STATE", {})
    monkeypatch.setattr(cpu_kernel, "_build", lambda: pytest.fail("the estimator must not compile"))
    m = _module(3, 32, False, 96)
    assert kernels.path_for(m, "cpu", torch.float32) == "cpu_fused"
    assert m.kernel_layout_nbytes("cpu", torch.float32) == 40 * 96 // 2  # what the estimator counts
