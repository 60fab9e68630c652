"""AutoRound (learned rounding offsets and clip ranges per decoder layer): the parametrization starts at
round-to-nearest exactly, its fused backward equals autograd's, the packed result is what was trained, a
decoder layer's output error goes down, and the method end to end (save/reload, options, errors)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import kjv_text
from hf_efficiency.hub.model_card import describe_method
from hf_efficiency.quant.calibrated.capture import LayerBatch
from hf_efficiency.quant.core.learned_rounding import LearnedRounding
from hf_efficiency.quant.core.scheme import quantize_weight
from hf_efficiency.quant.methods.autoround import minibatches, tune_layer_rounding

GRIDS = [(False, "integer"), (False, "float"), (True, "float")]


@pytest.mark.parametrize("symmetric,zero_point", GRIDS)
@pytest.mark.parametrize("group_size", [32, None])
def test_starts_at_round_to_nearest_exactly(symmetric, zero_point, group_size):
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(0))  # 80: a partial last group of 32
    r = LearnedRounding.init(w, 3, group_size, symmetric, zero_point)
    rtn = quantize_weight(w, 3, group_size, symmetric, zero_point=zero_point).dequantize()
    assert torch.equal(r.fake_quant(), rtn)
    assert torch.equal(r.pack().dequantize(), rtn)


@pytest.mark.parametrize("symmetric,zero_point", GRIDS)
@pytest.mark.parametrize("bits", [2, 4])
def test_fused_backward_equals_autograd_and_packing_keeps_the_trained_weight(symmetric, zero_point, bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 96, generator=g)
    r = LearnedRounding.init(w, bits, 32, symmetric, zero_point)
    with torch.no_grad():
        r.v.uniform_(-0.5, 0.5, generator=g)
        r.alpha.uniform_(0.6, 1.0, generator=g)
        r.beta.uniform_(0.6, 1.0, generator=g)
    upstream = torch.randn(24, 96, generator=g)
    fused = r.fake_quant()
    reference = r.reference_fake_quant()
    assert torch.equal(fused, reference)
    got = torch.autograd.grad((fused * upstream).sum(), r.parameters())
    want = torch.autograd.grad((reference * upstream).sum(), r.parameters())
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    packed = r.pack()
    assert torch.equal(packed.dequantize(), fused.detach())
    assert (packed.zero is not None) == (zero_point == "integer" and not symmetric)


def _layer_setup(seed=0):
    model = make_tiny_llama(seed=seed)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 32, 64, generator=g)
    pos = torch.arange(32)[None].expand(4, -1)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, pos), "attention_mask": None}
    with torch.no_grad():
        target = layer(hidden, **kwargs)
        target = target[0] if isinstance(target, tuple) else target
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    return layer, [LayerBatch(hidden, kwargs)], [target], names


def test_minibatches_split_every_batch_tensor_by_rows():
    layer, batches, targets, _ = _layer_setup()
    pieces = minibatches(batches, targets, 3)
    assert [p[0].shape[0] for p in pieces] == [3, 1]
    cos, sin = pieces[1][1]["position_embeddings"]
    assert cos.shape[0] == 1 and pieces[1][2].shape[0] == 1 and pieces[1][1]["attention_mask"] is None


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_tuning_lowers_the_layer_output_error(mixed_precision):
    layer, batches, targets, names = _layer_setup()
    roundings = {n: LearnedRounding.init(layer.get_submodule(n).weight, 2, 32) for n in names}
    pieces = minibatches(batches, targets, 2)
    before, after = tune_layer_rounding(layer, roundings, pieces, 60, 1 / 60, 0.5, mixed_precision)
    assert after < 0.8 * before, (before, after)
    assert any(float(r.v.detach().abs().max()) > 0 for r in roundings.values())
    for r in roundings.values():  # parameters stay in range
        assert float(r.v.detach().abs().max()) <= 0.5 and 0.5 <= float(r.alpha.detach().min()) <= 1.0


def test_tuning_that_does_not_help_is_undone():
    layer, batches, targets, names = _layer_setup()
    roundings = {n: LearnedRounding.init(layer.get_submodule(n).weight, 8, None) for n in names}
    pieces = minibatches(batches, targets, 4)
    # a huge step moves every offset to the edge: worse than round-to-nearest, so it is reset
    before, after = tune_layer_rounding(layer, roundings, pieces, 1, 0.9, 0.5, False)
    assert after == before
    assert all(float(r.v.detach().abs().max()) == 0 for r in roundings.values())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ar")
    make_tiny_llama(seed=5, tie=False, num_key_value_heads=4).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def test_autoround_end_to_end_beats_round_to_nearest_and_reloads_identically(tiny_dir, tmp_path):
    ids = make_byte_tokenizer()(kjv_text("evaluation")[:2000], return_tensors="pt").input_ids[:, :256]
    cal = {"dataset": [kjv_text("calibration")[:12000]], "samples": 6, "sequence_length": 128, "batch_size": 3}
    float_logits = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits.detach()
    errors, models = {}, {}
    for method in ("rtn", "autoround"):
        q = {"method": method, "bits": 2, "group_size": 32, "zero_point": "integer"}
        if method == "autoround":
            q["autoround"] = {"iters": 40, "windows_per_step": 2}
        model = AutoModelForCausalLM.from_pretrained(
            tiny_dir, efficiency_config=EfficiencyConfig(quantization=q, calibration=cal)
        )
        with torch.no_grad():
            errors[method] = float((model(ids).logits - float_logits).pow(2).mean())
        models[method] = model
    assert errors["autoround"] < 0.9 * errors["rtn"], errors
    model = models["autoround"]
    report = model.hf_quantizer.report.tuned_error
    assert set(report) == {"model.layers.0", "model.layers.1"}
    assert all(after <= before for before, after in report.values())
    model.save_pretrained(tmp_path / "ar")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ar")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    how = describe_method(model.config.quantization_config)
    assert how.startswith("AutoRound (`autoround`: rounding offsets and group clip ranges tuned by signed gradient")
    assert "calibrated on 6 x 128 tokens of `1 given texts`" in how


def test_autoround_options_and_outliers_are_checked():
    for key, value, allowed in (
        ("iters", 0, r"an integer in \[1, 10000\]"),
        ("lr", 1.5, r"0 or a float in \(0, 1\)"),
        ("min_factor", 1.0, r"a float in \(0, 1\)"),
        ("windows_per_step", 0, r"an integer in \[1, 1024\]"),
        ("mixed_precision", "yes", "True, False"),
    ):
        with pytest.raises(ValueError, match=f"quantization.autoround.{key}=.*allowed values: {allowed}"):
            EfficiencyConfig(quantization={"method": "autoround", "autoround": {key: value}})
    with pytest.raises(ValueError, match=r"quantization.outliers=0.01 is not allowed; allowed values: 0 \(autoround"):
        EfficiencyConfig(quantization={"method": "autoround", "outliers": 0.01})
