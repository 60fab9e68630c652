"""`QuantLinear` owns its state: every public way of changing its tensors (replacements, loads, LoRA and IA3
merges, ``load_state_dict``, dtype moves, parameter assignment) drops the kernel layouts derived from them,
so the fused CPU kernel never computes with stale codes, scales, minima or permutations. Each check runs
1, 4 and 40 rows (fused kernel, then de-quantization + GEMM) against the pure-torch reference."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn

import hf_efficiency  # noqa: F401 - registers the peft dispatchers
from hf_efficiency.peft import prepare_model_for_kbit_training
from hf_efficiency.peft.ia3 import QuantIA3Linear
from hf_efficiency.peft.lora import QuantLoraLinear
from hf_efficiency.quant.core.packing import pack
from hf_efficiency.quant.core.scheme import QuantizedWeight, num_groups
from hf_efficiency.quant.kernels import cpu as cpu_kernel
from hf_efficiency.quant.modules.linear import QuantLinear

OUT = 40
ROWS = (1, 4, 40)  # fused kernel (up to FUSED_MAX_ROWS = 16 rows), then de-quantization + float GEMM


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernel.extension() is not None, cpu_kernel.unavailable_reason()  # CI machines are x86-64 + AVX2


def _random_quantized(
    bits, group, sym, n, *, outliers=0, act_order=False, scale_dtype=torch.float16, seed=0, zero_point="float"
):
    g = torch.Generator().manual_seed(seed)
    integer = not sym and zero_point == "integer"
    groups = num_groups(n, group)
    index = value = perm = None
    if outliers:
        index = torch.stack([torch.randperm(n, generator=g)[:outliers] for _ in range(OUT)]).to(torch.int16)
        value = (torch.randn(OUT, outliers, generator=g) * 0.2).half()
    if act_order:
        perm = torch.randperm(n, generator=g).int()
    return QuantizedWeight(
        packed=pack(torch.randint(0, 2**bits, (OUT, n), generator=g), bits),
        scale=(torch.rand(OUT, groups, generator=g) * 0.02 + 1e-3).to(scale_dtype),
        minimum=None if sym or integer else (torch.randn(OUT, groups, generator=g) * 0.05).to(scale_dtype),
        bits=bits,
        group_size=group,
        in_features=n,
        outlier_index=index,
        outlier_value=value,
        perm=perm,
        zero=torch.randint(0, 2**bits, (OUT, groups), generator=g).to(torch.uint8) if integer else None,
    )


def _module(
    bits,
    group,
    sym,
    n,
    *,
    bias=True,
    outliers=0,
    act_order=False,
    scale_dtype=torch.float16,
    seed=0,
    zero_point="float",
):
    m = QuantLinear(
        n,
        OUT,
        bias,
        bits=bits,
        group_size=group,
        symmetric=sym,
        scale_dtype=scale_dtype,
        outliers=outliers,
        act_order=act_order,
        zero_point=zero_point,
    )
    m.load_quantized(
        _random_quantized(
            bits,
            group,
            sym,
            n,
            outliers=outliers,
            act_order=act_order,
            scale_dtype=scale_dtype,
            seed=seed,
            zero_point=zero_point,
        )
    )
    if bias:
        m.replace_tensors(bias=torch.randn(OUT, generator=torch.Generator().manual_seed(seed + 1)))
    return m.requires_grad_(False)


def _torch_weight(m):
    """The pure-torch de-quantization (the reference path), whatever the kernel does."""
    os.environ["HF_EFFICIENCY_KERNEL"] = "dequant"
    try:
        return m.dequantize_weight(torch.float32)
    finally:
        del os.environ["HF_EFFICIENCY_KERNEL"]


def _fused(m) -> bool:
    return cpu_kernel.eligible(m)


def prime(m):
    """One 1-row forward: the fused kernel builds and caches its layout (other modules cache nothing)."""
    if _fused(m):
        with torch.no_grad():
            m(torch.randn(1, m.in_features))
    assert (m.kernel_layout("cpu") is not None) == _fused(m)


def check(m):
    """``m``'s outputs for 1, 4 and 40 rows against the reference de-quantization (a stale layout fails)."""
    w = _torch_weight(m)
    bias = None if m.bias is None else m.bias.float()
    for rows in ROWS:
        x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            y = m(x)
        assert m.last_path == ("cpu_fused" if _fused(m) else "dequant")
        ref = F.linear(x, w, bias)
        if not _fused(m) or (rows > cpu_kernel.FUSED_MAX_ROWS and m.weight_perm is None):
            assert torch.equal(y, ref), rows  # the same weight, the same float GEMM
        else:  # float rounding of the fused sums (or of the permuted GEMM), relative to their size
            bound = (x.abs() @ w.abs().T).max() + (0 if bias is None else bias.abs().max())
            assert (y - ref).abs().max() <= 2e-6 * bound, (rows, (y - ref).abs().max() / bound)
    return w


def mutated(m, change):
    """Prime the cache, apply ``change``, check the cache is gone and the output follows the new tensors."""
    prime(m)
    before = _torch_weight(m)
    bias_before = None if m.bias is None else m.bias.detach().clone()
    change(m)
    assert m.kernel_layout("cpu") is None
    after = check(m)
    changed = not torch.equal(before, after) or (bias_before is not None and not torch.equal(bias_before, m.bias))
    return changed


CASES = {  # name: (bits, group, symmetric, in_features, keyword arguments of _module)
    "4bit-g32-asym": (4, 32, False, 96, {}),
    "4bit-channel-sym-nobias": (4, None, True, 96, {"bias": False}),
    "3bit-g64-asym-repacked": (3, 64, False, 128, {}),
    "8bit-channel-sym": (8, None, True, 96, {}),
    "2bit-g32-sym-padded": (2, 32, True, 100, {}),
    "6bit-g32-asym-repacked": (6, 32, False, 96, {"scale_dtype": torch.bfloat16}),
    "4bit-g32-asym-act-order": (4, 32, False, 96, {"act_order": True}),
    "4bit-g32-asym-outliers": (4, 32, False, 96, {"outliers": 2}),
    "5bit-g32-sym-outliers": (5, 32, True, 64, {"outliers": 1}),
    "4bit-g32-int-zero": (4, 32, False, 96, {"zero_point": "integer"}),
    "3bit-g64-int-zero-repacked": (3, 64, False, 128, {"zero_point": "integer"}),
    "8bit-channel-int-zero-bf16-padded": (
        8,
        None,
        False,
        100,
        {"zero_point": "integer", "scale_dtype": torch.bfloat16},
    ),
    "4bit-g32-int-zero-act-order-outliers": (
        4,
        32,
        False,
        96,
        {"zero_point": "integer", "act_order": True, "outliers": 1},
    ),
}


@pytest.fixture(params=list(CASES))
def case(request):
    bits, group, sym, n, kwargs = CASES[request.param]
    return lambda seed=0: _module(bits, group, sym, n, seed=seed, **kwargs)


def test_every_case_matches_the_reference(case):
    m = case()
    check(m)
    prime(m)
    check(m)  # the cached layout


def test_replace_tensors_one_at_a_time(case):
    m, other = case(), case(seed=5)
    for name in (
        "weight",
        "weight_scale",
        "weight_min",
        "weight_zero",
        "weight_outlier_value",
        "weight_outlier_index",
        "bias",
    ):
        if getattr(m, name) is not None:
            assert mutated(m, lambda m, name=name: m.replace_tensors(**{name: getattr(other, name)})), name
            assert torch.equal(getattr(m, name), getattr(other, name))
    if m.weight_perm is not None:  # a new column order of the same stored columns
        assert mutated(m, lambda m: m.replace_tensors(weight_perm=other.weight_perm.clone()))
    assert torch.equal(m.dequantize_weight(), other.dequantize_weight())


def test_replace_tensors_copies_the_values(case):
    m = case()
    scale = m.weight_scale.detach() * 2
    m.replace_tensors(weight_scale=scale)
    scale.zero_()  # the caller's tensor is not the module's
    assert bool((m.weight_scale != 0).all())


def test_load_quantized_and_load_state_dict(case):
    m, other, third = case(), case(seed=5), case(seed=9)
    q = _random_quantized(
        m.bits,
        m.group_size,
        m.symmetric,
        m.in_features,
        outliers=m.outliers,
        act_order=m.weight_perm is not None,
        scale_dtype=m.weight_scale.dtype,
        seed=7,
        zero_point=m.zero_point,
    )
    assert mutated(m, lambda m: m.load_quantized(q))
    assert mutated(m, lambda m: m.load_state_dict(other.state_dict()))  # copies in place
    assert mutated(m, lambda m: m.load_state_dict(copy.deepcopy(third.state_dict()), assign=True))
    assert torch.equal(m.dequantize_weight(), third.dequantize_weight())


def test_dtype_moves_and_storage_dtypes(case):
    m = case()
    if _fused(m) or m.bias is None:
        assert mutated(m, lambda m: m.to(torch.bfloat16))  # scales (and bias) rounded to bfloat16
    else:  # the reference path does not cast a bfloat16 bias for float32 inputs
        prime(m)
        m.to(torch.bfloat16)
        assert m.kernel_layout("cpu") is None
    assert m.weight_scale.dtype == torch.bfloat16
    assert not mutated(m, lambda m: m.to(torch.float32))  # exact way back: same numbers, new tensors
    assert m.weight_scale.dtype == torch.float32
    dtypes = m.storage_dtypes()
    assert "bias" not in dtypes and dtypes["weight"] == torch.int32
    assert dtypes.get("weight_zero", torch.uint8) == torch.uint8  # integer zero points stay uint8
    half = {name: torch.float16 for name in ("weight_scale", "weight_min") if name in dtypes}
    assert not mutated(m, lambda m: m.set_storage_dtypes(half))
    assert m.weight_scale.dtype == torch.float16
    assert not mutated(m, lambda m: m.set_storage_dtypes(dtypes))
    assert m.storage_dtypes() == dtypes


def test_assigning_a_parameter_drops_the_layouts(case):
    m = case()
    scale = nn.Parameter(m.weight_scale.detach() * 1.5, requires_grad=False)
    assert mutated(m, lambda m: setattr(m, "weight_scale", scale))


def test_copies_and_pickles_rebuild_their_own_layouts(case):
    m = case()
    prime(m)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone.kernel_layout("cpu") is None
        check(clone)
        prime(clone)
        clone.replace_tensors(weight_scale=clone.weight_scale.detach() * 3)
        assert not torch.equal(clone.dequantize_weight(), m.dequantize_weight())
    check(m)  # the original keeps its own tensors and layout


class _Net(nn.Module):
    def __init__(self, proj: QuantLinear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _merge_round_trip(layer, base):
    """Merge then unmerge ``layer``: the base follows both ways and ends exactly where it started."""
    pre = {n: t.detach().clone() for n, t in base.named_parameters()}
    assert mutated(base, lambda _: layer.merge())
    assert layer.merged
    assert mutated(base, lambda _: layer.unmerge())
    assert all(torch.equal(pre[n], t) for n, t in base.named_parameters())


def test_lora_merge_and_unmerge(case):
    net = get_peft_model(_Net(case()), LoraConfig(r=4, target_modules=["proj"]))
    layer = net.base_model.model.proj
    assert isinstance(layer, QuantLoraLinear)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    _merge_round_trip(layer, layer.get_base_layer())


def test_qalora_merge_folds_into_the_minima():
    m = _module(4, 32, False, 128, outliers=2, seed=3)  # kept outliers move with the minima
    net = get_peft_model(_Net(m), LoraConfig(r=4, target_modules=["proj"], use_qalora=True, qalora_group_size=32))
    layer = net.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    assert layer._folds_exactly("default")
    codes = m.weight.detach().clone()
    _merge_round_trip(layer, m)
    layer.merge()
    assert torch.equal(m.weight, codes)  # only the minima (and outlier values) moved
    check(m)

    fused = _module(4, 32, False, 128, seed=3)  # the fused kernel's layout holds the minima
    net = get_peft_model(_Net(fused), LoraConfig(r=4, target_modules=["proj"], use_qalora=True, qalora_group_size=32))
    layer = net.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    _merge_round_trip(layer, fused)


@pytest.mark.parametrize("feedforward,negative", [(False, False), (False, True), (True, False)])
def test_ia3_merge_and_unmerge(case, feedforward, negative):
    # output scaling (all positive: scales, minima, outliers and bias scale per row; with a negative value:
    # re-quantized) and input scaling (re-quantized)
    config = IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    net = get_peft_model(_Net(case()), config)
    layer = net.base_model.model.proj
    assert isinstance(layer, QuantIA3Linear) and layer.is_feedforward == feedforward
    with torch.no_grad():
        ia3 = layer.ia3_l["default"]
        ia3.copy_(torch.rand(ia3.shape, generator=torch.Generator().manual_seed(2)) + 0.5)
        if negative:
            ia3.view(-1)[0] = -1.0
    _merge_round_trip(layer, layer.get_base_layer())


def test_kbit_preparation_keeps_the_storage_dtypes():
    m = _module(3, 64, False, 128)
    dtypes = m.storage_dtypes()
    prime(m)
    prepare_model_for_kbit_training(_Net(m), use_gradient_checkpointing=False)
    assert m.storage_dtypes() == dtypes and m.kernel_layout("cpu") is None
    check(m)


def test_static_input_scale():
    m = QuantLinear(64, 8, True, bits=8, group_size=None, symmetric=True, act_mode="static")
    m.load_quantized(_w8(64, 8))
    m.replace_tensors(bias=torch.zeros(8))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(x)
    m.set_input_scale(torch.tensor([0.05], dtype=torch.float64))
    assert m.input_scale.dtype == torch.float32 and m.input_scale.shape == () and m.input_scale == torch.tensor(0.05)
    with torch.no_grad():
        after = m(x)
    fresh = copy.deepcopy(m)
    with torch.no_grad():
        assert torch.equal(after, fresh(x)) and not torch.equal(before, after)
    with pytest.raises(ValueError, match=r"input_scale: must be positive, got 0.0"):
        m.set_input_scale(0.0)
    with pytest.raises(ValueError, match=r"input_scale: values must be finite \(found inf or NaN\)"):
        m.set_input_scale(float("inf"))
    with pytest.raises(ValueError, match=r"input_scale: expected one value, got shape \(2,\)"):
        m.set_input_scale(torch.ones(2))
    with pytest.raises(ValueError, match=r"input_scale: this QuantLinear has no static activation scale"):
        _module(4, 32, False, 96).set_input_scale(1.0)


def _w8(n, out):
    g = torch.Generator().manual_seed(0)
    return QuantizedWeight(
        pack(torch.randint(0, 256, (out, n), generator=g), 8),
        (torch.rand(out, 1, generator=g) * 0.01).half(),
        None,
        8,
        None,
        n,
    )


def test_bad_replacements_name_the_tensor_and_change_nothing():
    m = _module(4, 32, False, 96, act_order=True)
    prime(m)
    state = {n: t.detach().clone() for n, t in m.state_dict().items()}
    bad = [
        (
            dict(weight_scale=torch.ones(OUT, 2).half()),
            r"weight_scale: shape \(40, 2\) does not match the module's \(40, 3\)",
        ),
        (
            dict(weight=torch.zeros(OUT, 4, dtype=torch.int64)),
            r"weight: shape \(40, 4\) does not match the module's \(40, 12\)",
        ),
        (
            dict(weight_min=torch.ones(OUT, 3)),
            r"weight_min: dtype torch.float32 does not match the module's torch.float16",
        ),
        (
            dict(weight_scale=m.weight_scale.detach().clone().fill_(float("inf"))),
            r"weight_scale: values must be finite",
        ),
        (dict(weight_min=torch.full((OUT, 3), float("nan")).half()), r"weight_min: values must be finite"),
        (
            dict(weight_scale=m.weight_scale.detach() * 2, bias=torch.full((OUT,), float("nan"))),
            r"bias: values must be finite",
        ),
        (
            dict(weight_perm=torch.full((96,), 96, dtype=torch.int32)),
            r"weight_perm: values must be column indices in \[0, 96\)",
        ),
        (
            dict(weight_outlier_value=torch.zeros(OUT, 1).half()),
            r"weight_outlier_value: this QuantLinear has no such tensor",
        ),
        (dict(input_scale=torch.tensor(1.0)), r"input_scale: this QuantLinear has no such tensor"),
        (dict(weight_scale=m.weight_scale.detach().tolist()), r"weight_scale: expected a torch.Tensor, got list"),
        (dict(bias=torch.zeros(OUT, device="meta")), r"bias: device meta does not match the module's cpu"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            m.replace_tensors(**kwargs)
        assert m.kernel_layout("cpu") is not None  # nothing changed: the layout stays valid
        assert all(torch.equal(state[n], t) for n, t in m.state_dict().items())
    sym = _module(4, 32, True, 96)
    with pytest.raises(ValueError, match=r"weight_min: this QuantLinear has no such tensor"):
        sym.replace_tensors(weight_min=torch.zeros(OUT, 3).half())
    with pytest.raises(ValueError, match=r"weight_min: this QuantLinear has no such tensor"):
        sym.set_storage_dtypes({"weight_min": torch.float32})
    with pytest.raises(ValueError, match=r"weight_min: dtype torch.float32 must be weight_scale's \(torch.float16\)"):
        m.set_storage_dtypes({"weight_min": torch.float32})
    big = _module(4, 32, True, 96, scale_dtype=torch.float32)
    big.replace_tensors(weight_scale=torch.full_like(big.weight_scale, 1e6))  # beyond float16
    with pytest.raises(ValueError, match=r"weight_scale: values must be finite"):
        big.set_storage_dtypes({"weight_scale": torch.float16})
    assert big.weight_scale.dtype == torch.float32
    integer = _module(4, 32, False, 96, zero_point="integer")
    prime(integer)
    with pytest.raises(ValueError, match=r"weight_zero: zero points must be integers in \[0, 15\] for 4-bit codes"):
        integer.replace_tensors(weight_zero=torch.full((OUT, 3), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"weight_zero: this QuantLinear has no such tensor"):
        m.replace_tensors(weight_zero=torch.zeros(OUT, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"weight_min: this QuantLinear has no such tensor"):
        integer.replace_tensors(weight_min=torch.zeros(OUT, 3).half())
    assert integer.kernel_layout("cpu") is not None
    outl = _module(4, 32, False, 96, outliers=2)
    with pytest.raises(ValueError, match=r"weight_outlier_index: values must be column indices in \[0, 96\)"):
        outl.replace_tensors(weight_outlier_index=torch.full((OUT, 2), -1, dtype=torch.int16))


def test_load_quantized_checks_before_changing_anything():
    m = _module(4, 32, False, 96)
    prime(m)
    state = {n: t.detach().clone() for n, t in m.state_dict().items()}
    wrong_rows = _random_quantized(4, 32, False, 96)
    wrong_rows.packed = wrong_rows.packed[:-1]
    nan_scale = _random_quantized(4, 32, False, 96)
    nan_scale.scale[0, 0] = float("nan")
    with_outliers = _random_quantized(4, 32, False, 96, outliers=1)
    for q, message in [
        (wrong_rows, r"weight: packed shape \(39, 12\) does not match the module's \(40, 12\)"),
        (nan_scale, r"weight_scale: values must be finite"),
        (with_outliers, r"quantized weight keeps 1 outliers per row; this module holds 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            m.load_quantized(q)
        assert m.kernel_layout("cpu") is not None
        assert all(torch.equal(state[n], t) for n, t in m.state_dict().items())


def test_a_stale_layout_would_be_caught(monkeypatch):
    """The checks above have teeth: with invalidation switched off, the 3-bit module's repacked copy goes stale."""
    m, other = _module(3, 64, False, 128), _module(3, 64, False, 128, seed=5)
    prime(m)
    monkeypatch.setattr(QuantLinear, "invalidate_kernel_cache", lambda self: None)
    m.replace_tensors(weight=other.weight)
    with pytest.raises(AssertionError):
        check(m)
