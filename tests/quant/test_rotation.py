"""Hadamard rotations (QuaRot): the matrices, the fast transform, rotating a float model without changing
what it computes, quantizing it with an online rotation in `QuantLinear`, save -> fresh-process reload
bit-identical, and the errors users hit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import kjv_text
from hf_efficiency.families import UnsupportedFamilyError
from hf_efficiency.hub.model_card import describe_method
from hf_efficiency.quant import QuantLinear
from hf_efficiency.quant.calibrated.rotation import residual_rotation, rotate_model
from hf_efficiency.quant.core.hadamard import (
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    random_signs,
    rotate_input_columns,
    rotation_matrix,
)

CAL = {"dataset": [kjv_text("calibration")[:12000]], "samples": 4, "sequence_length": 128, "batch_size": 2}


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 240, 576, 640, 1536])
def test_hadamard_matrix_is_orthonormal_with_entries_of_one_magnitude(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_hadamard_sizes_and_the_error_for_others():
    assert hadamard_factors(576) == ((12, 12), 4)
    assert hadamard_factors(1536) == ((12,), 128)
    assert hadamard_factors(640) == ((20,), 32)
    assert not has_hadamard(100) and not has_hadamard(0)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 100 is built here"):
        hadamard_matrix(100)


@pytest.mark.parametrize("n", [8, 12, 96, 576, 1536])
def test_fast_transform_equals_the_dense_rotation(n):
    signs = random_signs(n, seed=3)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    dense = x @ rotation_matrix(n, signs)
    assert torch.allclose(hadamard_transform(x, signs), dense, atol=1e-12)
    # the rotation folds into a weight: rotated input times rotated weight = the original product
    w = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x, signs) @ rotate_input_columns(w, signs).T, x @ w.T, atol=1e-10)


def test_random_signs_are_deterministic_and_residual_rotation_orthogonal_for_any_size():
    assert torch.equal(random_signs(64, 7), random_signs(64, 7))
    assert not torch.equal(random_signs(64, 7), random_signs(64, 8))
    for n in (64, 100):  # 100 has no Hadamard matrix here: a random orthogonal one
        q = residual_rotation(n, seed=0)
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("rotation", ["hadamard", "hadamard-folded"])
@pytest.mark.parametrize("tie", [True, False])
def test_rotated_float_model_computes_the_same_logits(rotation, tie):
    model = make_tiny_llama(seed=1, tie=tie)
    with torch.no_grad():  # norms that are not all ones, so folding them matters
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
        model.model.norm.weight.uniform_(0.5, 2.0)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        before = model(ids).logits
    online = rotate_model(model, rotation, seed=0)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
    expected = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] if rotation == "hadamard" else []
    assert sorted(online) == expected
    # the rotation removed the embedding's structure: its columns are mixed
    assert not torch.allclose(model.model.embed_tokens.weight.abs().mean(0), before.new_zeros(64))


def test_rotation_refuses_families_it_cannot_rotate_exactly():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedFamilyError, match="cannot rotate a 'gpt2' model exactly"):
        rotate_model(gpt2, "hadamard")
    with pytest.raises(ValueError, match="rotation='spin' is not allowed"):
        rotate_model(make_tiny_llama(), "spin")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_rot")
    model = make_tiny_llama(seed=5, tie=True)
    with torch.no_grad():
        for layer in model.model.layers:  # outlier channels, as in real LLMs
            layer.input_layernorm.weight[:3] *= 30
            layer.post_attention_layernorm.weight[:3] *= 30
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_w8a8_with_online_rotation_is_closer_to_float_and_reloads_bit_identical(tiny_dir, tmp_path):
    ids = make_byte_tokenizer()(kjv_text("evaluation")[:2000], return_tensors="pt").input_ids[:, :200]
    ref = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir), ids)
    errors = {}
    for rotation in (None, "hadamard"):
        cfg = EfficiencyConfig(
            quantization={"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "rotation": rotation},
            activations={"mode": "dynamic"},
            calibration=CAL,
        )
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, efficiency_config=cfg)
        errors[rotation] = float((_logits(model, ids) - ref).pow(2).mean())
    assert errors["hadamard"] < 0.5 * errors[None], errors
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.input_rotation is not None
    assert "input_rotation='hadamard'" in repr(down)
    assert model.model.layers[0].mlp.up_proj.input_rotation is None
    saved = model.config.quantization_config.quantization
    assert saved.online_rotation == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]

    out = tmp_path / "rotated"
    model.save_pretrained(out)
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    assert written["quantization_config"]["quantization"]["rotation"] == "hadamard"
    how = describe_method(model.config.quantization_config)
    assert "hidden states rotated by random Hadamard matrices before quantizing (QuaRot; folded into" in how
    torch.save((_logits(model, ids), _logits(model, ids[:, :10])), tmp_path / "logits.pt")  # long and short
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, hf_efficiency
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r})
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        want = torch.load({str(tmp_path / "logits.pt")!r})
        with torch.no_grad():
            got, short = m(ids).logits, m(ids[:, :10]).logits
        assert torch.equal(got, want[0]), (got - want[0]).abs().max()
        assert torch.equal(short, want[1]), (short - want[1]).abs().max()
        print("identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-2000:]


def test_dequantized_module_with_online_rotation_is_the_unrotated_float_linear(tiny_dir):
    cfg = EfficiencyConfig(
        quantization={"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "rotation": "hadamard"},
        calibration=CAL,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, efficiency_config=cfg)
    down = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, down.in_features)
    with torch.no_grad():
        assert torch.allclose(down.to_linear()(x), down(x), atol=1e-5)


def test_online_rotation_needs_the_module_quantized_and_bad_values_are_named(tiny_dir):
    cfg = EfficiencyConfig(
        quantization={
            "method": "rtn",
            "bits": 4,
            "group_size": 32,
            "rotation": "hadamard",
            "modules_to_not_convert": ["lm_head", "down_proj"],
        },
        calibration=CAL,
    )
    with pytest.raises(
        ValueError, match="rotates the input of model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj at run time"
    ):
        AutoModelForCausalLM.from_pretrained(tiny_dir, efficiency_config=cfg)
    for key, value, allowed in (
        ("rotation", "spinquant", "None, hadamard, hadamard-folded"),
        ("rotation_seed", -1, "a non-negative integer"),
        ("rotation_seed", 1.5, "a non-negative integer"),
        ("online_rotation", "model.layers.0.mlp.down_proj", "None or a list of module names"),
        ("online_rotation", ["x"], "None unless rotation='hadamard'"),
    ):
        with pytest.raises(ValueError, match=f"quantization.{key}=.*allowed values: {allowed}"):
            EfficiencyConfig(quantization={"method": "rtn", key: value})
    module = QuantLinear(64, 8, bits=4, group_size=32, symmetric=False, input_rotation=True)
    with pytest.raises(ValueError, match="input_rotation: the signs of a Hadamard rotation must all be -1 or 1"):
        module.replace_tensors(input_rotation=torch.zeros(64, dtype=torch.int8))
    with pytest.raises(ValueError, match="no Hadamard matrix of order 100"):
        QuantLinear(100, 8, bits=4, group_size=32, symmetric=False, input_rotation=True)


def test_exports_refuse_online_rotations_and_take_folded_ones(tiny_dir, tmp_path):
    from hf_efficiency.export import ExportError, export_model

    for rotation in ("hadamard", "hadamard-folded"):
        cfg = EfficiencyConfig(
            quantization={"method": "rtn", "bits": 4, "group_size": 32, "zero_point": "integer", "rotation": rotation},
            calibration=CAL,
        )
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, efficiency_config=cfg)
        if rotation == "hadamard":
            with pytest.raises(ExportError, match="model.layers.0.mlp.down_proj rotates its input by a Hadamard"):
                export_model(model, tmp_path / "ct", "compressed-tensors")
        else:
            report = export_model(model, tmp_path / "ct", "compressed-tensors")
            assert report.format == "compressed-tensors"


def test_rotation_keys_are_written_only_for_rotated_models():
    plain = EfficiencyConfig(quantization={"method": "rtn"}).to_dict()["quantization"]
    assert not {"rotation", "rotation_seed", "online_rotation"} & set(plain)
    rotated = EfficiencyConfig(quantization={"method": "rtn", "rotation": "hadamard-folded", "rotation_seed": 3})
    d = rotated.to_dict()["quantization"]
    assert (d["rotation"], d["rotation_seed"], d["online_rotation"]) == ("hadamard-folded", 3, None)
    assert EfficiencyConfig.from_dict(rotated.to_dict()) == rotated
