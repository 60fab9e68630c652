"""The Triton weight-only kernel (`hf_efficiency/quant/kernels/triton_kernels.py`) and its dispatch rule.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before triton is
imported): one subprocess runs every case and reports its error against the float32 reference
(``dequantize_codes`` + ``F.linear``), and each case is checked here. Tolerance per output element:
``u * |ref| + 1e-6 * B``, with ``u`` the unit roundoff of the output dtype (0 for float32, 2**-11 for float16,
2**-8 for bfloat16: one rounding of the output) and ``B = |x| @ (|u * scale| + |offset|).T + |bias|`` (float32
accumulation). The dispatch tests need neither triton nor a GPU (triton's presence is monkeypatched).

Run the cases by hand: ``TRITON_INTERPRET=1 PYTHONPATH=. python tests/quant/test_triton_kernels.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from hf_efficiency.quant.core.packing import pack
from hf_efficiency.quant.core.scheme import QuantizedWeight, dequantize_codes, num_groups
from hf_efficiency.quant.kernels import dispatch as kernels
from hf_efficiency.quant.kernels import triton_kernels
from hf_efficiency.quant.modules.linear import QuantLinear

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_TRITON = triton_kernels.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton; extra 'test')")
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (bits, grid, group, activation dtype, rows, in_features, out_features, split_k, block_n): K=200 is no multiple of
# any block (32/128) nor of the groups; N=40 is less than one 64-column block
CASES = [
    (bits, grid, group, dt, m, 200, 40, None, None)
    for bits, grid, group, dt, m in itertools.product(
        (4, 8), ("sym", "min", "zero"), (None, 32, 128), ("fp32", "fp16", "bf16"), (1, 3, 16)
    )
] + [
    (4, "min", 32, "bf16", 3, 300, 40, 3, None),  # K split over 3 programs (summed in fixed order)
    (8, "zero", None, "fp16", 1, 300, 40, 2, None),  # per channel, split
    (4, "sym", 64, "fp32", 16, 100, 70, None, 16),  # 5 column blocks, the last partial; group 64 (BLOCK_K 64)
    (8, "min", 32, "bf16", 20, 96, 40, None, None),  # more than 16 rows: 2 row blocks (a forced prefill)
    (4, "zero", 256, "fp16", 5, 520, 24, None, None),  # group 256, partial last group
]


def case_id(case) -> str:
    bits, grid, group, dt, m, k, n, split, bn = case
    extra = (f"-split{split}" if split else "") + (f"-bn{bn}" if bn else "")
    return f"int{bits}-{grid}-g{group or 'ch'}-{dt}-m{m}-k{k}-n{n}{extra}"


def random_weight(bits: int, grid: str, group: int | None, k: int, n: int, seed: int) -> dict:
    """Random codes over the full range, random scales (all three scale dtypes in turn), minima (negative too) or
    integer zero points: the tensors a QuantLinear holds."""
    g = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group)
    scale_dtype = SCALE_DTYPES[seed % 3]
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    return {
        "codes": codes,
        "weight": pack(codes, bits),
        "scale": (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(scale_dtype),
        "minimum": (torch.randn(n, groups, generator=g) * 0.05).to(scale_dtype) if grid == "min" else None,
        "zero": torch.randint(0, 2**bits, (n, groups), generator=g).to(torch.uint8) if grid == "zero" else None,
        "bias": torch.randn(n, generator=g) if seed % 2 else None,
    }


def error_ratio(y: torch.Tensor, x: torch.Tensor, t: dict, bits: int, group: int | None) -> float:
    """Largest ``|y - ref| / tolerance`` over the output (see the module docstring); <= 1 passes."""
    codes, scale = t["codes"], t["scale"].double()
    n, k = codes.shape
    w = dequantize_codes(codes, t["scale"], t["minimum"], bits, group, torch.float32, zero=t["zero"])
    bias = None if t["bias"] is None else t["bias"].to(x.dtype).double()
    ref = x.double() @ w.double().T + (0 if bias is None else bias)
    g = k if group is None else group
    s = scale.repeat_interleave(g, dim=1)[:, :k]
    if t["zero"] is not None:
        off = -(t["zero"].double() * scale)
    elif t["minimum"] is not None:
        off = t["minimum"].double()
    else:
        off = -(2 ** (bits - 1)) * scale
    off = off.repeat_interleave(g, dim=1)[:, :k]
    bound = x.double().abs() @ ((codes.double() * s).abs() + off.abs()).T + (0 if bias is None else bias.abs())
    tol = UNIT_ROUNDOFF[x.dtype] * ref.abs() + 1e-6 * bound
    return float(((y.double() - ref).abs() / tol).max())


def run_case(case, seed: int) -> dict:
    bits, grid, group, dt, m, k, n, split, bn = case
    t = random_weight(bits, grid, group, k, n, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DTYPES[dt])
    y = triton_kernels.weight_only_matmul(
        x,
        t["weight"],
        t["scale"],
        bits=bits,
        in_features=k,
        group_size=group,
        minimum=t["minimum"],
        zero=t["zero"],
        bias=t["bias"],
        split_k=split,
        block_n=bn,
    )
    assert y.shape == (m, n) and y.dtype == x.dtype
    return {"ratio": error_ratio(y, x, t, bits, group)}


def module_cases() -> dict:
    """QuantLinear through dispatch with HF_EFFICIENCY_KERNEL=cuda_triton on CPU tensors (interpreter)."""
    out = {}
    torch.manual_seed(0)
    for name, kw in {
        "int4-g32-float-min": dict(bits=4, group_size=32, symmetric=False),
        "int4-g64-integer-zero": dict(bits=4, group_size=64, symmetric=False, zero_point="integer"),
        "int8-channel-sym": dict(bits=8, group_size=None, symmetric=True),
    }.items():
        lin = torch.nn.Linear(160, 48)
        q = QuantLinear.from_linear(lin, **kw)
        x = torch.randn(2, 3, 160)
        os.environ["HF_EFFICIENCY_KERNEL"] = "dequant"
        with torch.no_grad():
            ref = q(x)
        os.environ["HF_EFFICIENCY_KERNEL"] = "cuda_triton"
        with torch.no_grad():
            y = q(x)
        out[name] = {
            "path": q.last_path,
            "shape": list(y.shape),
            "max_abs_err": float((y - ref).abs().max()),
            "ref_max": float(ref.abs().max()),
        }
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=3, group_size=32, symmetric=False)
    try:
        with torch.no_grad():  # (with a gradient the dequant_autograd path runs whatever is forced)
            q(torch.randn(1, 64))
        out["int3-forced"] = {"raised": None}
    except ValueError as exc:
        out["int3-forced"] = {"raised": str(exc)}
    del os.environ["HF_EFFICIENCY_KERNEL"]
    return out


def worker() -> None:
    assert triton_kernels.interpreting(), "run with TRITON_INTERPRET=1"
    results = {case_id(c): run_case(c, seed) for seed, c in enumerate(CASES)}
    results["modules"] = module_cases()
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every case run once under TRITON_INTERPRET=1 in a fresh process (triton reads the variable on import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_EFFICIENCY_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS ") :])


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference_in_interpreter(interpreted, case):
    assert interpreted[case_id(case)]["ratio"] <= 1.0, interpreted[case_id(case)]


@needs_triton
def test_quantlinear_forward_through_forced_triton_path(interpreted):
    mods = interpreted["modules"]
    for name in ("int4-g32-float-min", "int4-g64-integer-zero", "int8-channel-sym"):
        r = mods[name]
        assert r["path"] == "cuda_triton" and r["shape"] == [2, 3, 48], (name, r)
        assert r["max_abs_err"] <= 1e-5 * max(1.0, r["ref_max"]), (name, r)  # float32: summation order only
    assert "bits=3" in mods["int3-forced"]["raised"]


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = random_weight(4, "sym", 32, 64, 8, 0)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        triton_kernels.weight_only_matmul(
            torch.randn(1, 64), t["weight"], t["scale"], bits=4, in_features=64, group_size=32
        )


def test_bad_arguments_raise_before_launch():
    if not triton_kernels.triton_available():
        with pytest.raises(RuntimeError, match="needs triton"):
            triton_kernels.weight_only_matmul(
                torch.randn(1, 64),
                torch.zeros(8, 8, dtype=torch.int32),
                torch.ones(8, 2),
                bits=4,
                in_features=64,
                group_size=32,
            )
        return
    t = random_weight(4, "sym", 32, 64, 8, 0)
    call = triton_kernels.weight_only_matmul
    with pytest.raises(ValueError, match="bits=3"):
        call(torch.randn(1, 64), t["weight"], t["scale"], bits=3, in_features=64, group_size=32)
    with pytest.raises(ValueError, match="group_size=16"):
        call(torch.randn(1, 64), t["weight"], t["scale"], bits=4, in_features=64, group_size=16)
    with pytest.raises(ValueError, match="float64"):
        call(torch.randn(1, 64, dtype=torch.float64), t["weight"], t["scale"], bits=4, in_features=64, group_size=32)
    with pytest.raises(ValueError, match=r"scale must be \[8, 2\]"):
        call(torch.randn(1, 64), t["weight"], t["scale"][:, :1], bits=4, in_features=64, group_size=32)


# --- dispatch (no GPU, no triton needed: availability is monkeypatched) ---


def _module(bits, group, sym, in_f=256, out_f=64, zero_point="float", **kw):
    m = QuantLinear(in_f, out_f, True, bits=bits, group_size=group, symmetric=sym, zero_point=zero_point, **kw)
    q = QuantizedWeight(
        packed=pack(torch.randint(0, 2**bits, (out_f, in_f)), bits),
        scale=torch.full((out_f, num_groups(in_f, group)), 0.01, dtype=torch.float16),
        minimum=None if sym or zero_point == "integer" else torch.zeros(out_f, num_groups(in_f, group)).half(),
        bits=bits,
        group_size=group,
        in_features=in_f,
        zero=torch.full((out_f, num_groups(in_f, group)), 3, dtype=torch.uint8) if zero_point == "integer" else None,
    )
    if kw.get("act_order"):
        q.perm = torch.arange(in_f, dtype=torch.int32)
    if kw.get("outliers"):
        q.outlier_index = torch.zeros(out_f, kw["outliers"], dtype=torch.int16)
        q.outlier_value = torch.zeros(out_f, kw["outliers"], dtype=torch.float16)
    m.load_quantized(q)
    return m


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.delenv("HF_EFFICIENCY_KERNEL", raising=False)
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: True)


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DISPATCH = [  # (bits, group, symmetric, zero_point, in, out, dtype, path with triton)
    (8, None, True, "float", 256, 64, BF16, "cuda_int8"),  # torch's int8 kernel keeps what it computes
    (8, None, True, "float", 256, 64, FP16, "cuda_int8"),
    (4, 64, False, "float", 256, 64, BF16, "cuda_int4"),  # tinygemm keeps bf16 int4 with its shapes
    (4, 128, True, "float", 256, 64, BF16, "cuda_int4"),
    (4, 128, False, "integer", 256, 64, BF16, "cuda_int4"),
    (8, None, True, "float", 256, 64, FP32, "cuda_triton"),  # fp32 activations: no torch kernel
    (8, None, False, "float", 256, 64, BF16, "cuda_triton"),  # asymmetric int8
    (8, None, False, "integer", 256, 64, FP16, "cuda_triton"),
    (8, 64, True, "float", 256, 64, BF16, "cuda_triton"),  # grouped int8
    (4, 64, False, "float", 256, 64, FP16, "cuda_triton"),  # fp16 int4 (tinygemm wants bf16)
    (4, 128, False, "float", 576, 64, BF16, "cuda_triton"),  # 576 = SmolLM2's hidden size: no multiple of 128
    (4, 64, False, "float", 256, 60, BF16, "cuda_triton"),  # out_features not a multiple of 8
    (4, None, True, "float", 256, 64, BF16, "cuda_triton"),  # per-channel int4
    (4, 96, False, "float", 256, 64, BF16, "cuda_triton"),  # a group tinygemm refuses
    (4, 512, False, "integer", 1024, 64, BF16, "cuda_triton"),
    (4, 16, False, "float", 256, 64, BF16, "dequant"),  # groups of 16 codes (GGUF-like): no Triton kernel
    (3, 64, False, "float", 256, 64, BF16, "dequant"),  # 3-bit codes
    (2, 32, False, "float", 256, 64, FP16, "dequant"),
]


@pytest.mark.parametrize("bits,group,sym,zp,in_f,out_f,dtype,expected", DISPATCH)
def test_cuda_dispatch_rule(with_triton, monkeypatch, bits, group, sym, zp, in_f, out_f, dtype, expected):
    m = _module(bits, group, sym, in_f, out_f, zero_point=zp)
    for rows in (1, 3, kernels.CUDA_KERNEL_MAX_ROWS):
        assert kernels.path_for(m, "cuda", dtype, rows) == expected
    assert kernels.path_for(m, "cuda", dtype, kernels.CUDA_KERNEL_MAX_ROWS + 1) == "dequant"  # prefill
    assert kernels.path_for(m, "cpu", dtype, 1) != "cuda_triton"
    if expected == "cuda_triton":
        assert m.kernel_layout_nbytes("cuda", dtype) == 0  # reads the packed words in place
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: False)
    assert kernels.path_for(m, "cuda", dtype, 1) == ("dequant" if expected == "cuda_triton" else expected)


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(outliers=2), "dequant"),  # outliers are only applied by dequant
        (dict(act_order=True), "dequant"),  # weight_perm
        (dict(act_mode="dynamic"), "w8a8"),
    ],
)
def test_modules_the_kernel_cannot_compute(with_triton, kw, expected):
    sym = "act_mode" in kw
    m = _module(8, None, sym, **kw)
    assert kernels.path_for(m, "cuda", FP32, 1) == expected
    assert not triton_kernels.eligible(m)


def test_env_forces_the_triton_path(monkeypatch):
    assert "cuda_triton" in kernels.KERNEL_PATHS
    monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "cuda_triton")
    m = _module(8, None, True)
    assert kernels.path_for(m, "cuda", BF16, 1) == "cuda_triton"  # instead of cuda_int8
    assert kernels.path_for(m, "cuda", BF16, 64) == "cuda_triton"  # forced: any row count


def test_importing_without_triton_works():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch, hf_efficiency\n"
        "from hf_efficiency.quant.kernels import dispatch, triton_kernels as tk\n"
        "from hf_efficiency.quant import QuantLinear\n"
        "assert not tk.triton_available() and 'triton' in tk.unavailable_reason()\n"
        "q = QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=32, symmetric=False)\n"
        "assert dispatch.path_for(q, 'cuda', torch.float16, 1) == 'dequant'\n"
        "assert q(torch.randn(2, 64)).shape == (2, 8)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_EFFICIENCY_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize(
    "bits,group,sym,zp,dtype",
    [
        (4, 128, False, "float", FP16),
        (4, 32, False, "integer", BF16),
        (8, None, False, "float", BF16),
        (8, 64, True, "float", FP32),
    ],
)
def test_triton_on_cuda_matches_cpu_reference(bits, group, sym, zp, dtype, monkeypatch):
    monkeypatch.delenv("HF_EFFICIENCY_KERNEL", raising=False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 320)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group, symmetric=sym, zero_point=zp)
    w = q.dequantize_weight(torch.float32)
    qc = q.cuda()
    for rows in (1, 5, 16):
        x = torch.randn(rows, 576).to(dtype)
        ref = torch.nn.functional.linear(x.float(), w, lin.bias.to(dtype).float())
        with torch.no_grad():
            out = qc(x.cuda())
        assert qc.last_path == "cuda_triton"
        assert (out.float().cpu() - ref).abs().max() <= 4 * UNIT_ROUNDOFF[dtype] * ref.abs().max() + 1e-4


if __name__ == "__main__":  # the interpreter worker (see the `interpreted` fixture)
    worker()
