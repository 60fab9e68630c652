"""Quantization-aware training: FakeQuantLinear, prepare_qat, Trainer, convert_qat and the round trip."""

import copy

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_efficiency
from hf_efficiency import EfficiencyConfig, QuantizationSpec, QuantLinear, convert_qat
from hf_efficiency.quant.modules.qat import FakeQuantLinear, fake_quantize_weight, prepare_qat

W3 = {"quantization": {"bits": 3, "group_size": 32}}


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def _perturb(model, seed=1):
    """Move the float weights a little, as training would (so the test is not on the initial weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "bits,group,sym", [(3, 64, False), (2, 32, False), (4, 32, True), (8, None, True), (3, 32, False), (2, None, False)]
)
def test_fake_quant_is_bit_identical_to_quant_linear(dtype, bits, group, sym):
    torch.manual_seed(bits)
    linear = nn.Linear(80, 24).to(dtype)  # 80 = 2 x 32 + a partial group of 16
    fq = FakeQuantLinear.from_linear(linear, bits=bits, group_size=group, symmetric=sym)
    ref = QuantLinear.from_linear(linear, bits=bits, group_size=group, symmetric=sym)
    assert torch.equal(fq.quantized_weight(), ref.dequantize_weight(dtype))
    x = torch.randn(3, 5, 80).to(dtype)
    assert torch.equal(fq(x), ref(x))
    packed = fq.to_quant_linear()
    assert torch.equal(packed.weight, ref.weight) and torch.equal(packed.weight_scale, ref.weight_scale)
    if not sym:
        assert torch.equal(packed.weight_min, ref.weight_min)
    # the float32 result is the scheme's own fake_quantize
    if dtype == torch.float32:
        assert torch.equal(
            fake_quantize_weight(linear.weight, bits, group, sym),
            hf_efficiency.quant.fake_quantize(linear.weight, bits, group, sym),
        )


def test_straight_through_gradient_and_shared_parameters():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    fq = FakeQuantLinear.from_linear(linear, bits=2, group_size=32, symmetric=False)
    assert fq.weight is linear.weight and fq.bias is linear.bias
    x = torch.randn(7, 64)
    grad_out = torch.randn(7, 16)
    fq(x).backward(grad_out)
    # STE: d loss / d w is the gradient w.r.t. the quantized weight, x^T g, unchanged by the rounding
    assert torch.allclose(fq.weight.grad, grad_out.T @ x, atol=1e-5)
    assert torch.allclose(fq.bias.grad, grad_out.sum(0), atol=1e-5)
    assert "bits=2, group_size=32, symmetric=False" in repr(fq)
    back = fq.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight


def test_prepare_qat_swaps_exactly_what_the_quantizer_quantizes(tmp_path):
    model = make_tiny_llama(seed=3, tie=False)
    model.save_pretrained(tmp_path / "fp")
    cfg = {
        "quantization": {
            "bits": 3,
            "group_size": 32,
            "modules_to_not_convert": ["lm_head", "v_proj"],
            "module_bits": {"down_proj": 4, r"model\.layers\.1\.self_attn\.q_proj": 2},
        }
    }
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", efficiency_config=cfg)
    weights = {n: p for n, p in model.named_parameters()}
    prepare_qat(model, cfg)
    kinds, ref = _kinds(model), _kinds(quantized)
    assert [n for n, k in kinds.items() if k == "FakeQuantLinear"] == [n for n, k in ref.items() if k == "QuantLinear"]
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.self_attn.v_proj"] == "Linear"
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            assert module.bits == quantized.get_submodule(name).bits
    assert model.model.layers[0].mlp.down_proj.bits == 4 and model.model.layers[1].self_attn.q_proj.bits == 2
    # parameters are the same objects (no copy), still trainable, same dtype
    assert all(p is weights[n] and p.requires_grad for n, p in model.named_parameters())
    assert isinstance(model.hf_efficiency_qat, EfficiencyConfig)
    assert getattr(model.config, "quantization_config", None) is None


def test_default_skip_keeps_lm_head_and_tied_embeddings():
    for tie in (True, False):
        model = prepare_qat(make_tiny_llama(tie=tie), W3)
        kinds = _kinds(model)
        assert kinds["lm_head"] == "Linear" and sum(k == "FakeQuantLinear" for k in kinds.values()) == 14


@pytest.mark.parametrize(
    "config",
    [W3, EfficiencyConfig(**W3), QuantizationSpec(bits=3, group_size=32)],
    ids=["dict", "EfficiencyConfig", "QuantizationSpec"],
)
def test_config_forms(config, ids):
    before = copy.deepcopy(config)
    model = prepare_qat(make_tiny_llama(), config)
    assert model.hf_efficiency_qat.quantization.bits == 3 and model.hf_efficiency_qat.quantization.group_size == 32
    assert (config.to_dict() if not isinstance(config, dict) else config) == (
        before.to_dict() if not isinstance(before, dict) else before
    )  # the caller's object is not mutated
    model(ids)


def test_trainer_trains_the_fake_quantized_model(tmp_path, byte_tokenizer):
    model = prepare_qat(make_tiny_llama(seed=1), {"quantization": {"bits": 2, "group_size": 32}})
    before = model.model.layers[0].mlp.up_proj.quantized_weight().clone()
    text = "In the beginning God created the heaven and the earth. " * 40
    rows = torch.tensor(byte_tokenizer(text)["input_ids"][: 16 * 32]).view(16, 32)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=3e-3,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    assert isinstance(trainer.model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.quantized_weight(), before)  # the codes moved


@pytest.mark.parametrize("tie", [True, False])
def test_convert_qat_logits_and_save_reload_round_trip(tmp_path, ids, tie):
    model = prepare_qat(make_tiny_llama(seed=2, tie=tie), {"quantization": {"bits": 3, "group_size": 32}})
    _perturb(model)
    with torch.no_grad():
        qat_logits = model(ids).logits
    converted = convert_qat(model)
    assert converted is model and not model.training
    kinds = _kinds(model)
    assert sum(k == "QuantLinear" for k in kinds.values()) == 14 and "FakeQuantLinear" not in kinds.values()
    assert model.is_quantized and model.hf_quantizer.pre_quantized
    assert model.config.quantization_config.quantization.bits == 3
    assert not hasattr(model, "hf_efficiency_qat")
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, qat_logits, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(reloaded.model.layers[0].mlp.up_proj) is QuantLinear
    assert reloaded.config.quantization_config.quantization.bits == 3
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    # the converted model is an ordinary quantized model (dtype given: after save_pretrained config.dtype is a str,
    # which EfficiencyHfQuantizer._dequantize does not convert yet)
    floats = model.dequantize(dtype=torch.float32)
    assert type(floats.model.layers[0].mlp.up_proj) is nn.Linear and not floats.is_quantized
    with torch.no_grad():
        assert torch.equal(floats(ids).logits, logits)


def test_mixed_widths_and_bfloat16_round_trip(tmp_path, ids):
    cfg = {"quantization": {"bits": 2, "group_size": 32, "symmetric": True, "module_bits": {"down_proj": 4}}}
    make_tiny_llama(seed=4).save_pretrained(tmp_path / "fp")
    # loaded in bfloat16 (``.to(bfloat16)`` would also round the rotary buffers, which loading does not)
    model = prepare_qat(AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.bfloat16), cfg)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    _perturb(model)
    with torch.no_grad():
        qat_logits = model(ids).logits
        convert_qat(model)
        assert model.model.layers[1].mlp.down_proj.bits == 4 and model.model.layers[1].mlp.up_proj.bits == 2
        assert torch.equal(model(ids).logits, qat_logits)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, qat_logits)


def test_float_checkpoint_of_a_qat_model_requantizes_to_the_converted_model(tmp_path, ids):
    """A checkpoint saved while training (e.g. by Trainer) is a plain float checkpoint; quantizing it
    with the same config on load gives exactly the converted model."""
    model = prepare_qat(make_tiny_llama(seed=5), W3)
    _perturb(model)
    model.save_pretrained(tmp_path / "float")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    assert not any(isinstance(m, (FakeQuantLinear, QuantLinear)) for m in plain.modules())
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "float", efficiency_config=W3)
    with torch.no_grad():
        assert torch.equal(requantized(ids).logits, convert_qat(model)(ids).logits)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"quantization.bits=5 is not allowed; allowed values: 8, 4, 3, 2"):
        prepare_qat(make_tiny_llama(), {"quantization": {"bits": 5}})
    with pytest.raises(ValueError, match="needs a 'quantization' section"):
        prepare_qat(make_tiny_llama(), {"attention": {"kv_cache_bits": 8}})
    with pytest.raises(ValueError, match="method='gptq' is not supported by quantization-aware training"):
        prepare_qat(make_tiny_llama(), {"quantization": {"method": "gptq", "bits": 3, "group_size": 32}})
    with pytest.raises(ValueError, match="clip='mse' is not supported"):
        prepare_qat(make_tiny_llama(), {"quantization": {"bits": 3, "clip": "mse"}})
    with pytest.raises(ValueError, match="outliers=0.01 is not supported"):
        prepare_qat(make_tiny_llama(), {"quantization": {"bits": 3, "outliers": 0.01}})
    with pytest.raises(ValueError, match="a 'peft' section is not supported"):
        prepare_qat(make_tiny_llama(), {**W3, "peft": {"method": "bitfit"}})
    with pytest.raises(ValueError, match="remove the 'activations' section"):
        prepare_qat(
            make_tiny_llama(),
            {"quantization": {"bits": 8, "group_size": None, "symmetric": True}, "activations": {"mode": "dynamic"}},
        )
    with pytest.raises(ValueError, match="matched no nn.Linear module"):
        prepare_qat(make_tiny_llama(), {"quantization": {"bits": 3, "modules_to_not_convert": [".*"]}})
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        prepare_qat(nn.Sequential(nn.Linear(4, 4)), W3)
    with pytest.raises(TypeError, match="config must be an EfficiencyConfig"):
        prepare_qat(make_tiny_llama(), "int3")
    model = prepare_qat(make_tiny_llama(), W3)
    with pytest.raises(ValueError, match="prepare_qat was already applied"):
        prepare_qat(model, W3)
    with pytest.raises(ValueError, match="convert_qat found no FakeQuantLinear"):
        convert_qat(make_tiny_llama())
    convert_qat(model)
    with pytest.raises(ValueError, match="convert_qat found no FakeQuantLinear"):
        convert_qat(model)
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat(model, W3)
    with pytest.raises(ValueError, match="bits=5 is not allowed"):
        FakeQuantLinear(8, 8, bits=5, group_size=None, symmetric=True)


def test_sections_the_model_already_carries_are_kept(tmp_path, ids):
    make_tiny_llama(seed=6).save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", efficiency_config={"attention": {"kv_cache_bits": 8}})
    prepare_qat(model, W3)  # a model carrying only non-weight sections is still a float model
    assert model.hf_efficiency_qat.attention.kv_cache_bits == 8
    convert_qat(model)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    cfg = reloaded.config.quantization_config
    assert cfg.attention.kv_cache_bits == 8 and cfg.quantization.bits == 3
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_convert_refuses_layers_that_would_not_reload():
    model = prepare_qat(make_tiny_llama(), W3)
    model.model.layers[0].mlp.up_proj.bits = 4  # changed by hand: the saved config would rebuild 3 bits
    with pytest.raises(ValueError, match="the saved checkpoint would not reload"):
        convert_qat(model)
    assert isinstance(model.model.layers[1].mlp.up_proj, FakeQuantLinear)  # nothing was converted
    model = prepare_qat(make_tiny_llama(), W3)
    model.model.layers[0].mlp.up_proj = model.model.layers[0].mlp.up_proj.to_linear()
    with pytest.raises(ValueError, match="are not the linears the recorded config quantizes"):
        convert_qat(model)


def test_converted_model_card_names_the_training():
    from hf_efficiency.hub.model_card import render_model_card

    model = prepare_qat(make_tiny_llama(seed=2), {"quantization": {"bits": 2, "group_size": 32}})
    convert_qat(model, training="distilled from the float model on 1k tokens of KJV")
    text = str(render_model_card(model))
    assert "after quantization-aware training (QAT), distilled from the float model on 1k tokens of KJV" in text
    plain = prepare_qat(make_tiny_llama(seed=2), {"quantization": {"bits": 2, "group_size": 32}})
    assert "after quantization-aware training (QAT)" in str(render_model_card(convert_qat(plain)))
    again = prepare_qat(make_tiny_llama(seed=2), {"quantization": {"bits": 2, "group_size": 32}})
    with pytest.raises(TypeError, match="training must be a string describing the training, got int"):
        convert_qat(again, training=3)
