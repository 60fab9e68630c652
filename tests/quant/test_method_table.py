"""The method table: a method declared in one place reaches the config, the quantizer, the pipeline
and the model card (a toy method registered for the test proves it)."""

from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny_llama

from hf_efficiency import EfficiencyConfig
from hf_efficiency.hub.model_card import describe_method
from hf_efficiency.quant import QuantLinear
from hf_efficiency.quant.core.scheme import quantize_weight
from hf_efficiency.quant.methods import METHODS, get_method
from hf_efficiency.quant.methods.base import MethodOptions, QuantMethod, float_open, option


@dataclass
class ToyOptions(MethodOptions):
    shrink: float = option(0.9, "fixed shrink of every group's range", float_open(0, 1))


class ToyMethod(QuantMethod):
    """Symmetric round-to-nearest on a fixed shrink of the range (the 'rtn-sym-mse' of the issue, simplified)."""

    name = "toy-sym"
    summary = "symmetric round-to-nearest on a shrunk range"
    options = ToyOptions

    def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
        shrunk = weight.clamp(-options.shrink * weight.abs().amax(), options.shrink * weight.abs().amax())
        return quantize_weight(shrunk, fmt.bits, fmt.group_size, fmt.symmetric, scale_dtype=fmt.scale_dtype), None

    def describe(self, options, clip):
        return f"toy symmetric rounding at {options.shrink:.0%} of the range"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, ToyMethod.name, ToyMethod())
    return METHODS[ToyMethod.name]


def test_the_table_lists_every_method_with_its_options():
    assert list(METHODS) == ["rtn", "hqq", "awq", "gptq", "autoround"]
    assert [m for m, spec in METHODS.items() if spec.calibrated] == ["awq", "gptq", "autoround"]
    assert get_method("gptq").options.field_names() == ["damp", "act_order", "block_size"]
    assert get_method("autoround").options.field_names() == [
        "iters",
        "lr",
        "min_factor",
        "windows_per_step",
        "mixed_precision",
    ]
    assert [m for m, spec in METHODS.items() if spec.tunes_layer] == ["autoround"]
    with pytest.raises(
        ValueError, match="unknown quantization method 'int4'; allowed values: rtn, hqq, awq, gptq, autoround"
    ):
        get_method("int4")


def test_a_registered_method_is_configured_quantizes_saves_and_reloads(toy, tmp_path):
    cfg = EfficiencyConfig(
        quantization={"method": "toy-sym", "bits": 4, "group_size": 32, "symmetric": True, "toy-sym": {"shrink": 0.5}}
    )
    assert cfg.to_dict()["quantization"]["toy-sym"] == {"shrink": 0.5}
    assert EfficiencyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(
        ValueError, match=r"quantization.toy-sym.shrink=2 is not allowed; allowed values: a float in \(0, 1\)"
    ):
        EfficiencyConfig(quantization={"method": "toy-sym", "toy-sym": {"shrink": 2}})
    assert "toy symmetric rounding at 50% of the range" in describe_method(cfg)

    float_model = make_tiny_llama()
    float_model.save_pretrained(tmp_path / "float")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", efficiency_config=cfg)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.symmetric
    w = float_model.model.layers[0].self_attn.q_proj.weight.detach()
    expected = toy.quantize(w, _fmt(cfg), cfg.quantization.options)[0].dequantize()
    assert torch.equal(q_proj.dequantize_weight(torch.float32), expected)
    model.save_pretrained(tmp_path / "toy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert torch.equal(again(ids).logits, model(ids).logits)


def _fmt(cfg):
    from hf_efficiency.quant.methods import weight_format

    return weight_format(cfg.quantization, cfg.quantization.bits, torch.float16)


def test_a_registered_method_gets_its_command_line_flags(toy):
    from hf_efficiency.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["quantize", "--out", "x", "--method", "toy-sym", "--symmetric", "--toy-sym-shrink", "0.25"]
    )
    assert config_from_args(args)["quantization"]["toy-sym"] == {"shrink": 0.25}
    args = build_parser().parse_args(["quantize", "--out", "x", "--method", "rtn", "--toy-sym-shrink", "0.25"])
    with pytest.raises(ValueError, match="--toy-sym-shrink: option\\(s\\) of method 'toy-sym', but --method is 'rtn'"):
        config_from_args(args)
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    text = " ".join(quantize.format_help().split())
    assert (
        "{rtn,hqq,awq,gptq,autoround,toy-sym}" in text
        and "toy-sym: symmetric round-to-nearest on a shrunk range" in text
    )
    assert "--toy-sym-shrink TOY_SYM_SHRINK fixed shrink of every group's range (default: 0.9)" in text
