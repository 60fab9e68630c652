"""The grid view of a QuantLinear that every exporter writes: exact where the target holds our grid,
converted with a measured change only when asked, refused with the module and reason otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_efficiency.export.grid import ExportError, GridTarget, module_grid
from hf_efficiency.quant.core.scheme import QuantizedWeight, quantize_weight
from hf_efficiency.quant.modules.linear import QuantLinear

INTEGER = GridTarget("integer-format", bits=(4, 8), zero="integer")
FLOAT_MIN = GridTarget(
    "block-format", bits=(4, 5, 8), zero="float", block=32, act_order=False, symmetric_only_bits=(8,)
)
SYMMETRIC = GridTarget("symmetric-format", bits=(4, 8), zero="symmetric")


def linear(n_in: int = 128, n_out: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def quantized(bits: int, group_size: int | None, symmetric: bool, **kw) -> QuantLinear:
    return QuantLinear.from_linear(linear(**kw), bits=bits, group_size=group_size, symmetric=symmetric)


def whole_step_module(bits: int = 4, group_size: int = 32) -> QuantLinear:
    """An asymmetric module whose float minima are whole steps (-z * s): what GPTQ/AWQ checkpoints hold."""
    torch.manual_seed(1)
    out, n = 16, 64
    groups = n // group_size
    codes = torch.randint(0, 2**bits, (out, n))
    scale = (torch.rand(out, groups) * 0.01 + 0.001).half()
    zero = torch.randint(0, 2**bits, (out, groups))
    minimum = -(zero.float() * scale.float())
    from hf_efficiency.quant.core.packing import pack

    q = QuantizedWeight(pack(codes, bits), scale.float(), minimum, bits, group_size, n)
    return QuantLinear.from_quantized(nn.Linear(n, out), q, symmetric=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_symmetric_grids_are_exact_everywhere_and_narrow_widths_widen(bits, group_size):
    m = quantized(bits, group_size, True)
    reference = m.dequantize_weight()
    for target in (INTEGER, FLOAT_MIN, SYMMETRIC):
        g = module_grid("layer", m, target)
        assert g.exact and g.change == 0.0
        assert g.bits == min(b for b in target.bits if b >= bits)
        assert g.zero is None and g.minimum is None
        assert torch.equal(g.dequantize(), reference)


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_float_minimum_is_exact_in_a_float_minimum_format(bits):
    m = quantized(bits, 64, False)
    g = module_grid("layer", m, FLOAT_MIN)
    assert g.exact and g.zero is None and g.minimum is not None
    assert torch.equal(g.dequantize(), m.dequantize_weight())


def test_whole_step_minima_become_exact_integer_zero_points():
    m = whole_step_module()
    g = module_grid("layer", m, INTEGER)
    assert g.exact and g.zero.dtype == torch.int32
    assert int(g.zero.min()) >= 0 and int(g.zero.max()) <= 15
    assert torch.equal(g.dequantize(), m.dequantize_weight())


def test_float_minimum_to_integer_format_is_refused_with_module_and_reason():
    m = quantized(4, 32, False)
    with pytest.raises(ExportError) as e:
        module_grid("model.layers.0.mlp.up_proj", m, INTEGER)
    msg = str(e.value)
    assert msg.startswith("model.layers.0.mlp.up_proj: cannot be written to integer-format exactly")
    assert "float minima are not whole steps of the scale" in msg
    assert "zero_point='integer'" in msg and "lossy=True" in msg


def test_lossy_conversion_measures_the_change():
    m = quantized(4, 32, False)
    g = module_grid("layer", m, INTEGER, lossy=True)
    assert not g.exact and g.reasons
    w = m.dequantize_weight()
    diff = g.dequantize() - w
    assert g.change == pytest.approx(float(diff.abs().max() / w.abs().max()), rel=1e-6)
    assert g.rms_change == pytest.approx(float(diff.norm() / w.norm()), rel=1e-6)
    assert 0 < g.change < 0.2
    assert int(g.zero.min()) >= 0 and int(g.zero.max()) <= 15


@pytest.mark.parametrize(
    ("module", "target", "reason"),
    [
        (
            lambda: quantized(4, 32, False),
            SYMMETRIC,
            "it is asymmetric and symmetric-format stores symmetric grids only",
        ),
        (
            lambda: quantized(8, 32, False),
            FLOAT_MIN,
            "it is asymmetric and block-format stores 8-bit weights symmetric only",
        ),
        (lambda: quantized(4, 16, True), FLOAT_MIN, "group size 16 is not one block-format stores"),
        (
            lambda: quantized(4, 32, True),
            GridTarget("narrow", bits=(2,)),
            "4-bit codes do not fit the narrow widths [2]",
        ),
    ],
)
def test_each_refusal_names_its_reason(module, target, reason):
    with pytest.raises(ExportError, match="^layer: cannot be written") as e:
        module_grid("layer", module(), target)
    assert reason in str(e.value)
    g = module_grid("layer", module(), target, lossy=True)
    assert reason in g.reasons and g.change > 0


def test_float32_scales_are_refused_unless_exact_in_float16():
    m = quantized(4, 32, True)
    m.set_storage_dtypes({"weight_scale": torch.float32})  # fp16 values held in fp32: still exact
    assert module_grid("layer", m, INTEGER).exact
    m.replace_tensors(weight_scale=m.weight_scale * (1 + 1e-6))
    with pytest.raises(ExportError, match=r"its scales \(torch.float32\) are not exact in float16"):
        module_grid("layer", m, INTEGER)


def test_outliers_act_order_and_int8_activations_are_named():
    from hf_efficiency.quant.core.outliers import attach_outliers

    lin = linear()
    q = QuantLinear.from_linear(lin, bits=4, group_size=32, symmetric=True)
    index = torch.zeros(48, 1, dtype=torch.int16)
    qw = QuantizedWeight(q.weight.detach(), q.weight_scale.detach(), None, 4, 32, 128)
    with_outliers = QuantLinear.from_quantized(lin, attach_outliers(qw, index, lin.weight.detach()), symmetric=True)
    with pytest.raises(ExportError, match="keeps 1 outlier weights per row exactly"):
        module_grid("layer", with_outliers, INTEGER)
    g = module_grid("layer", with_outliers, INTEGER, lossy=True)
    assert g.change > 0 and torch.allclose(g.dequantize(), with_outliers.dequantize_weight(), atol=0.05)

    perm = torch.randperm(128).to(torch.int32)
    qp = QuantizedWeight(q.weight.detach(), q.weight_scale.detach(), None, 4, 32, 128, perm=perm)
    act_order = QuantLinear.from_quantized(lin, qp, symmetric=True)
    assert module_grid("layer", act_order, INTEGER).exact  # the integer target stores g_idx
    assert torch.equal(module_grid("layer", act_order, INTEGER).dequantize(), act_order.dequantize_weight())
    with pytest.raises(ExportError, match="cannot store an act-order column permutation"):
        module_grid("layer", act_order, FLOAT_MIN)

    w8a8 = QuantLinear.from_quantized(
        lin, quantize_weight(lin.weight, 8, None, True), symmetric=True, act_mode="dynamic"
    )
    with pytest.raises(ExportError, match=r"quantizes its activations to int8 \(dynamic\)"):
        module_grid("layer", w8a8, INTEGER)
    kept = module_grid("layer", w8a8, GridTarget("w8a8-format", bits=(8,), int8_activations=True))
    assert kept.exact and kept.act_mode == "dynamic"


def test_g_idx_follows_the_permutation():
    lin = linear(64, 8)
    q = QuantLinear.from_linear(lin, bits=4, group_size=32, symmetric=True)
    perm = torch.randperm(64).to(torch.int32)
    qp = QuantizedWeight(q.weight.detach(), q.weight_scale.detach(), None, 4, 32, 64, perm=perm)
    g = module_grid("layer", QuantLinear.from_quantized(lin, qp, symmetric=True), INTEGER)
    g_idx = g.g_idx()
    # stored column j (group j // 32) holds input feature perm[j]
    assert torch.equal(g_idx[perm.long()], torch.arange(64, dtype=torch.int32) // 32)


def test_whole_group_sizes_and_exact_regrouping():
    from hf_efficiency.export.grid import regroup, whole_group_size, whole_groups

    assert whole_group_size(None, 576) is None
    assert whole_group_size(128, 1536) == 128
    assert whole_group_size(128, 576) == 64  # SmolLM2's hidden size: 4.5 groups of 128
    assert whole_group_size(40, 64) == 0  # shares only 8
    assert whole_group_size(1024, 576) is None  # one group covers the row
    wide = QuantLinear.from_linear(linear(576, 16), bits=4, group_size=128, symmetric=False)
    deep = QuantLinear.from_linear(linear(1536, 16), bits=4, group_size=128, symmetric=False)
    assert whole_groups({"wide": wide, "deep": deep}) == {"wide": 64, "deep": 64}  # one size for both
    for m in (wide, deep):
        g = module_grid("m", m, FLOAT_MIN)
        r = regroup(g, 64)
        assert r.group_size == 64 and r.groups == -(-m.in_features // 64)
        assert torch.equal(r.dequantize(), m.dequantize_weight())
    with pytest.raises(ValueError, match="blocks of 48 do not tile groups of 128"):
        regroup(module_grid("m", deep, FLOAT_MIN), 48)
