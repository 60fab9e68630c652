"""Integer zero points (``quantization.zero_point="integer"``): ``w = (u - z) * s`` with a uint8 ``z`` per group,
for every method, in `QuantLinear`, the kernels, save/reload, merges and the config."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig, QuantizationSpec, QuantLinear
from hf_efficiency.demo import kjv_text
from hf_efficiency.export.grid import GridTarget, module_grid
from hf_efficiency.quant.core.packing import unpack
from hf_efficiency.quant.core.requantize import requantize_weight
from hf_efficiency.quant.core.scheme import fake_quantize, num_groups, quantize_weight
from hf_efficiency.quant.kernels import cpu as cpu_kernel
from hf_efficiency.quant.kernels.dispatch import int4_scales_and_zeros
from hf_efficiency.quant.methods import METHODS, quantize_matrix
from hf_efficiency.quant.methods.hqq import hqq_quantize
from hf_efficiency.quant.modules.qat import fake_quantize_weight


def _weight(out=48, n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    w[:, 7] *= 8  # a heavy column, as in real LLM weights
    w[0, :32] = torch.rand(32, generator=g) + 0.5  # a group that does not straddle 0
    return w


def integer_reference(packed, scale, zero, bits, group_size, n) -> torch.Tensor:
    """``(u - z) * s`` in float32, straight from the stored tensors."""
    u = unpack(packed, bits, n).float()
    g = n if group_size is None else group_size
    z = zero.float().repeat_interleave(g, dim=1)[:, :n]
    s = scale.float().repeat_interleave(g, dim=1)[:, :n]
    return (u - z) * s


def _check_integer(q, bits):
    assert q.minimum is None and q.zero is not None and q.zero.dtype == torch.uint8
    assert q.zero.shape == q.scale.shape and int(q.zero.max()) <= 2**bits - 1
    assert torch.equal(
        q.dequantize(torch.float32), integer_reference(q.packed, q.scale, q.zero, bits, q.group_size, q.in_features)
    )


# --- config ---------------------------------------------------------------------------------
def test_config_validates_and_round_trips():
    spec = QuantizationSpec(method="gptq", bits=4, zero_point="integer")
    assert spec.format_of("model.layers.0.mlp.up_proj")["zero_point"] == "integer"
    cfg = EfficiencyConfig(quantization=spec)
    again = EfficiencyConfig(**json.loads(cfg.to_json_string()))
    assert again == cfg and again.quantization.zero_point == "integer"
    assert QuantizationSpec.from_dict(spec.to_dict()).zero_point == "integer"
    assert QuantizationSpec.from_dict({"bits": 4}).zero_point == "float"  # configs written before the key
    with pytest.raises(
        ValueError, match=r"quantization.zero_point='int' is not allowed; allowed values: float, integer"
    ):
        QuantizationSpec(zero_point="int")
    with pytest.raises(ValueError, match=r"quantization.zero_point='integer' is not allowed; allowed values: 'float'"):
        QuantizationSpec(symmetric=True, zero_point="integer")
    with pytest.raises(ValueError, match=r"zero_point='integer' is not allowed with symmetric=True"):
        QuantLinear(64, 8, bits=4, group_size=32, symmetric=True, zero_point="integer")


def test_module_formats_carry_the_zero_point():
    spec = QuantizationSpec(
        zero_point="integer",
        module_formats={"a": {"bits": 8}, "b": {"symmetric": True}, "c": {"zero_point": "float"}},
    )
    assert spec.format_of("a")["zero_point"] == "integer"  # missing: the section's (asymmetric module)
    assert spec.format_of("b")["zero_point"] == "float"  # missing, symmetric module: float
    assert spec.format_of("c")["zero_point"] == "float"
    assert "zero_point" in QuantizationSpec.FORMAT_KEYS
    with pytest.raises(ValueError, match=r"module_formats\['m'\].zero_point='x' is not allowed; allowed values: float"):
        QuantizationSpec(module_formats={"m": {"zero_point": "x"}})
    with pytest.raises(ValueError, match=r"module_formats\['m'\].zero_point='integer' is not allowed"):
        QuantizationSpec(module_formats={"m": {"symmetric": True, "zero_point": "integer"}})


# --- scheme -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (2, 32), (8, None), (4, 48)])
@pytest.mark.parametrize("clip", ["none", "mse"])
def test_quantize_weight_stores_integer_zero_points_exactly(bits, group, clip):
    w = _weight()
    q = quantize_weight(w, bits, group, False, clip, scale_dtype=torch.float16, zero_point="integer")
    _check_integer(q, bits)
    # the error stays close to the float-minimum grid (range widened to 0 only where a group needs it)
    f = quantize_weight(w, bits, group, False, clip, scale_dtype=torch.float16)
    err_int = (q.dequantize() - w).pow(2).mean()
    err_float = (f.dequantize() - w).pow(2).mean()
    assert err_int <= 1.3 * err_float, (err_int, err_float)
    # a group that does not straddle 0 is still represented (its range widened to include 0)
    assert (q.dequantize()[0, :32] - w[0, :32]).abs().max() <= q.scale[0, 0].float()
    if clip == "none":  # fake_quantize: the min/max grid, no clip search
        assert torch.equal(fake_quantize(w, bits, group, False, torch.float16, "integer"), q.dequantize())


def test_dequantization_in_other_dtypes_is_one_rounding():
    w = _weight()
    q = quantize_weight(w, 4, 32, False, scale_dtype=torch.bfloat16, zero_point="integer")
    ref = integer_reference(q.packed, q.scale, q.zero, 4, 32, w.shape[1])
    assert torch.equal(q.dequantize(torch.float32), ref)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(q.dequantize(dtype), ref.to(dtype))  # (u - z) exact, one product rounding


def test_bad_zero_point_argument():
    with pytest.raises(ValueError, match=r"zero_point='yes' is not allowed; allowed values: float, integer"):
        quantize_weight(_weight(), 4, 32, False, zero_point="yes")


# --- methods ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64)])
def test_every_method_gives_integer_zero_points(method, bits, group):
    w = _weight(out=32, n=128, seed=bits)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    hessian = x.T @ x / x.shape[0]
    spec = QuantizationSpec(method=method, bits=bits, group_size=group, zero_point="integer")
    q = quantize_matrix(w, spec, bits, scale_dtype=torch.float16, hessian=hessian)
    _check_integer(q, bits)
    module = QuantLinear.from_quantized(nn.Linear(128, 32, bias=False), q, symmetric=False)
    assert module.zero_point == "integer" and module.weight_min is None
    ref = integer_reference(module.weight, module.weight_scale, module.weight_zero, bits, group, 128)
    assert torch.equal(module.dequantize_weight(), ref)
    fq = quantize_matrix(
        w, spec.with_method(method, zero_point="float"), bits, scale_dtype=torch.float16, hessian=hessian
    )
    err_int, err_float = (q.dequantize() - w).pow(2).mean(), (fq.dequantize() - w).pow(2).mean()
    assert err_int <= 1.5 * err_float, (method, err_int, err_float)


def test_gptq_act_order_and_outliers_with_integer_zero_points():
    w = _weight(out=32, n=128)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.2, 3, 128)
    spec = QuantizationSpec.from_dict(
        {"method": "gptq", "bits": 4, "group_size": 32, "zero_point": "integer", "gptq": {"act_order": True}}
    )
    q = quantize_matrix(w, spec, 4, scale_dtype=torch.float16, hessian=x.T @ x / 256, outliers=2)
    assert q.zero is not None and q.minimum is None and q.outlier_index is not None  # static groups: no perm
    module = QuantLinear.from_quantized(nn.Linear(128, 32, bias=False), q, symmetric=False)
    assert torch.equal(module.dequantize_weight(), q.dequantize())


def test_hqq_integer_is_never_worse_than_integer_round_to_nearest():
    w = _weight(out=64, n=256, seed=3)
    for bits in (2, 3, 4):
        for optimize_scale in (False, True):
            h = hqq_quantize(w, bits, 64, zero_point="integer", optimize_scale=optimize_scale)
            r = quantize_weight(w, bits, 64, False, zero_point="integer")
            _check_integer(h, bits)
            err = lambda q: (q.dequantize() - w).abs().reshape(64, 4, 64).mean(-1)  # noqa: E731
            assert bool((err(h) <= err(r) + 1e-7).all()), (bits, optimize_scale)


def test_requantize_keeps_integer_zero_points():
    w = _weight(out=32, n=128)
    q = quantize_weight(w, 4, 32, False, zero_point="integer")
    target = q.dequantize() + 0.002 * torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    kw = dict(bits=4, group_size=32, symmetric=False, zero_point="integer")
    refit = requantize_weight(target, scale=q.scale, zero=q.zero, **kw)
    rtn = requantize_weight(target, method="rtn", **kw)
    for r in (refit, rtn):
        _check_integer(r, 4)
    assert (refit.dequantize() - target).pow(2).sum() <= (rtn.dequantize() - target).pow(2).sum()
    with pytest.raises(ValueError, match="needs the previous scale"):
        requantize_weight(target, scale=q.scale, **kw)


def test_qat_fake_quantization_matches_the_integer_module():
    w = _weight(out=32, n=128)
    lin = nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    module = QuantLinear.from_linear(lin, bits=3, group_size=32, symmetric=False, zero_point="integer")
    for dtype in (torch.float32, torch.bfloat16):
        fq = fake_quantize_weight(w, 3, 32, False, torch.float16, dtype, "integer")
        assert torch.equal(fq, module.dequantize_weight(dtype))


# --- module, kernels, storage -----------------------------------------------------------------
def _integer_module(bits=4, group=32, n=128, out=40, scale_dtype=torch.float16, seed=0):
    lin = nn.Linear(n, out)
    with torch.no_grad():
        lin.weight.copy_(_weight(out, n, seed))
    m = QuantLinear.from_linear(
        lin, bits=bits, group_size=group, symmetric=False, scale_dtype=scale_dtype, zero_point="integer"
    )
    return m.requires_grad_(False)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (8, None), (2, 32)])
def test_fused_cpu_kernel_matches_the_reference(bits, group):
    assert cpu_kernel.extension() is not None, cpu_kernel.unavailable_reason()
    m = _integer_module(bits, group)
    ref = integer_reference(m.weight, m.weight_scale, m.weight_zero, bits, group, m.in_features)
    os.environ["HF_EFFICIENCY_KERNEL"] = "dequant"
    try:
        assert torch.equal(m.dequantize_weight(), ref)
    finally:
        del os.environ["HF_EFFICIENCY_KERNEL"]
    assert torch.equal(m.dequantize_weight(), ref)  # the kernel's de-quantization
    for rows in (1, 4, 40):
        x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            y = m(x)
        assert m.last_path == "cpu_fused"
        expect = torch.nn.functional.linear(x, ref, m.bias)
        if rows > cpu_kernel.FUSED_MAX_ROWS:
            assert torch.equal(y, expect)
        else:
            bound = (x.abs() @ ref.abs().T).max() + m.bias.abs().max()
            assert (y - expect).abs().max() <= 2e-6 * bound
    lay = m.kernel_layout("cpu")
    assert lay.scale.dtype == torch.float32 and lay.minimum.dtype == torch.float32
    groups = num_groups(m.in_features, group)
    assert cpu_kernel.layout_bytes(m) == (0 if bits != 3 else m.out_features * 128 * 4 // 8) + 8 * 40 * groups
    assert m.kernel_layout_nbytes("cpu", torch.float32) == cpu_kernel.layout_bytes(m)


def test_storage_bits_state_dict_and_repr():
    m = _integer_module(4, 32)
    assert m.storage_bits_per_weight == pytest.approx(4 + (16 + 8) / 32)
    sd = m.state_dict()
    assert "weight_zero" in sd and "weight_min" not in sd and sd["weight_zero"].dtype == torch.uint8
    assert m.storage_dtypes()["weight_zero"] == torch.uint8
    assert "zero_point='integer'" in repr(m)
    with pytest.raises(ValueError, match=r"weight_zero: zero points must be integers in \[0, 15\]"):
        m.replace_tensors(weight_zero=torch.full_like(m.weight_zero, 16))
    with pytest.raises(ValueError, match=r"weight_zero: dtype torch.int32 does not match the module's torch.uint8"):
        m.replace_tensors(weight_zero=m.weight_zero.int())
    with pytest.raises(ValueError, match=r"weight_zero: dtype torch.float16 is not allowed"):
        m.set_storage_dtypes({"weight_zero": torch.float16})
    with pytest.raises(ValueError, match=r"weight_min: this QuantLinear has no such tensor"):
        m.replace_tensors(weight_min=torch.zeros_like(m.weight_scale))
    float_q = quantize_weight(_weight(40, 128), 4, 32, False)
    with pytest.raises(ValueError, match="disagree on integer zero points"):
        m.load_quantized(float_q)


def test_cuda_int4_scales_and_zeros_formula():
    m = _integer_module(4, 32)
    sz = int4_scales_and_zeros(m, torch.float32)  # [G, out, 2]: w = (u - 8) * scale + zero
    u = unpack(m.weight, 4, m.in_features).float()
    s = sz[..., 0].t().repeat_interleave(32, 1)
    zero = sz[..., 1].t().repeat_interleave(32, 1)
    assert torch.allclose((u - 8) * s + zero, m.dequantize_weight(), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_kernel_matches_the_cpu_reference():
    m = _integer_module(4, 128, n=512, out=256)
    x = torch.randn(5, 512)
    ref = torch.nn.functional.linear(x, m.dequantize_weight(torch.float32), m.bias)
    mc = m.cuda()
    out = mc(x.cuda().to(torch.bfloat16))
    assert mc.last_path == "cuda_int4"
    assert (out.float().cpu() - ref).abs().max() < 0.02 * ref.abs().max()


def test_exact_export_grid():
    m = _integer_module(4, 32)
    grid = module_grid("proj", m, GridTarget("gptq", bits=(4, 8), zero="integer"))
    assert grid.exact and torch.equal(grid.zero, m.weight_zero.int())
    assert torch.equal(grid.dequantize(), m.dequantize_weight())


# --- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-zp")
    make_tiny_llama(seed=5, tie=False, num_key_value_heads=4).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


CAL = {"dataset": [kjv_text("calibration")[:6000]], "samples": 4, "sequence_length": 128, "batch_size": 2}


@pytest.mark.parametrize(
    "quant",
    [
        {"method": "rtn", "bits": 4, "group_size": 32, "clip": "mse"},
        {"method": "hqq", "bits": 3, "group_size": 64},
        {"method": "awq", "bits": 4, "group_size": 32},
        {"method": "gptq", "bits": 3, "group_size": 64},
    ],
    ids=lambda q: q["method"],
)
def test_save_and_reload_bit_identical(tiny_dir, tmp_path, quant):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    calibrated = METHODS[quant["method"]].calibrated
    cfg = {"quantization": {**quant, "zero_point": "integer"}, **({"calibration": CAL} if calibrated else {})}
    q = AutoModelForCausalLM.from_pretrained(tiny_dir, efficiency_config=cfg)
    mods = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(mods) == 14
    for m in mods:
        assert m.zero_point == "integer" and m.weight_min is None and int(m.weight_zero.max()) < 2**m.bits
    with torch.no_grad():
        logits = q(ids).logits
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quantization"]["zero_point"] == "integer"
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_slice("model.layers.0.mlp.up_proj.weight_zero").get_dtype() == "U8"
    assert not any(k.endswith("weight_min") for k in keys)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(m.zero_point == "integer" for m in again.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_lora_merge_keeps_integer_zero_points():
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    m = _integer_module(4, 32)
    net = get_peft_model(Net(m), LoraConfig(r=4, target_modules=["proj"]))
    layer = net.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
        unmerged = net(x)
    expected = m.dequantize_weight() + layer.get_delta_weight("default")
    layer.merge()
    assert m.weight_min is None and m.weight_zero.dtype == torch.uint8 and m.zero_point == "integer"
    w = m.dequantize_weight()
    assert torch.equal(w, integer_reference(m.weight, m.weight_scale, m.weight_zero, 4, 32, 128))
    # the refit never does worse than a fresh integer round-to-nearest of the merged weight
    fresh = quantize_weight(expected, 4, 32, False, zero_point="integer").dequantize()
    assert (w - expected).pow(2).sum() <= (fresh - expected).pow(2).sum()
    layer.unmerge()
    with torch.no_grad():
        assert torch.equal(net(x), unmerged)
