"""BitFit, freezing the lower layers and bottleneck adapters (`EfficiencyConfig(peft=...)`) on the tiny
Llama: exact trainable counts, unchanged logits at init, stock Trainer runs, save/load round trips,
quantized bases, error messages."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from hf_efficiency import EfficiencyConfig
from hf_efficiency.config import PeftSpec
from hf_efficiency.peft.adapters import BottleneckAdapter
from hf_efficiency.peft.methods import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    apply_peft,
    load_peft_weights,
    peft_parameter_names,
    print_trainable_parameters,
    save_peft_weights,
    trainable_parameters,
)
from hf_efficiency.quant.modules.linear import QuantLinear

# Tiny Llama (conftest): vocab 257, hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads.
EMB = 257 * 64  # 16448
LINEARS = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}
LAYER = sum(i * o for i, o in LINEARS.values()) + 2 * 64  # 36864 linear weights + 2 RMSNorms = 36992
TOTAL_TIED = EMB + 2 * LAYER + 64  # 90496 (+ final norm; lm_head tied)
BIASES = 2 * sum(o for _, o in LINEARS.values())  # 2 x 512 = 1024


def adapter_numel(m: int, h: int = 64) -> int:
    return m * h + m + h * m + h  # down [m, h] + [m], up [h, m] + [h]


QUANT = {"method": "rtn", "bits": 4, "group_size": 32}
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. "
) * 4


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 24):
        ids = list(TEXT.encode())
        self.rows = [ids[7 * i : 7 * i + length] for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.tensor(self.rows[i])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def perturb(model) -> None:
    """Move every trained parameter, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in peft_parameter_names(model):
            p = model.get_parameter(n)
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "fp"
    make_tiny_llama(seed=1).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    "section, message",
    [
        ({}, r"peft.method=None is not allowed; allowed values: bitfit, freeze, adapters"),
        ({"method": "lora"}, r"peft.method='lora' is not allowed"),
        (
            {"method": "adapters", "adapter_size": 0},
            r"peft.adapter_size=0 is not allowed; allowed values: an integer >= 1",
        ),
        ({"method": "adapters", "adapter_size": -4}, r"peft.adapter_size=-4 is not allowed"),
        (
            {"method": "freeze", "freeze_layers": -1},
            r"peft.freeze_layers=-1 is not allowed; allowed values: an integer >= 0",
        ),
        (
            {"method": "adapters", "adapter_placement": "parallel"},
            r"peft.adapter_placement='parallel' is not allowed; allowed values: pfeiffer, houlsby",
        ),
        ({"method": "adapters", "adapter_nonlinearity": "tanh"}, r"allowed values: relu, gelu, silu"),
        ({"method": "adapters", "adapter_init_scale": 0}, r"peft.adapter_init_scale=0 is not allowed"),
        (
            {"method": "bitfit", "bitfit_targets": "q_proj"},
            r"peft.bitfit_targets='q_proj' is not allowed; allowed values: None or a non-empty list",
        ),
        ({"method": "bitfit", "bitfit_targets": ["q_proj["]}, r"'q_proj\[' is not a regex"),
        ({"method": "bitfit", "bitfit_add_missing": 1}, r"peft.bitfit_add_missing=1 is not allowed"),
        ({"method": "bitfit", "rank": 8}, r"unknown key\(s\) 'rank' in section 'peft'"),
    ],
)
def test_spec_rejects_bad_values(section, message):
    with pytest.raises(ValueError, match=message):
        EfficiencyConfig(peft=section)


def test_spec_travels_in_the_config_dict():
    cfg = EfficiencyConfig(peft={"method": "adapters", "adapter_size": 16})
    assert isinstance(cfg.peft, PeftSpec) and cfg.to_dict()["peft"]["adapter_size"] == 16
    assert EfficiencyConfig(**json.loads(cfg.to_json_string())) == cfg


# ------------------------------------------------------------------------------ structure and counts


@pytest.mark.parametrize(
    "tie, spec, trainable, total",
    [
        (True, {"method": "bitfit"}, BIASES, TOTAL_TIED + BIASES),
        (True, {"method": "bitfit", "bitfit_targets": ["v_proj", "o_proj"]}, 2 * (32 + 64), TOTAL_TIED + 2 * (32 + 64)),
        (True, {"method": "freeze", "freeze_layers": 0}, TOTAL_TIED - EMB, TOTAL_TIED),
        (True, {"method": "freeze", "freeze_layers": 1}, LAYER + 64, TOTAL_TIED),  # tied head frozen with the embedding
        (False, {"method": "freeze", "freeze_layers": 1}, LAYER + 64 + EMB, TOTAL_TIED + EMB),  # untied head trains
        (True, {"method": "freeze", "freeze_layers": 2}, 64, TOTAL_TIED),  # only the final norm is left
        (True, {"method": "adapters", "adapter_size": 8}, 2 * adapter_numel(8), TOTAL_TIED + 2 * adapter_numel(8)),
        (
            True,
            {"method": "adapters", "adapter_size": 8, "adapter_placement": "houlsby", "adapter_nonlinearity": "gelu"},
            4 * adapter_numel(8),
            TOTAL_TIED + 4 * adapter_numel(8),
        ),
        (
            True,
            {"method": "adapters", "adapter_size": 4, "trainable_modules": [r".*norm"]},
            2 * adapter_numel(4) + 2 * 128 + 64,
            TOTAL_TIED + 2 * adapter_numel(4),
        ),
    ],
)
def test_trainable_counts_by_hand_and_logits_unchanged_at_init(tie, spec, trainable, total, capsys):
    model = make_tiny_llama(seed=1, tie=tie)
    before = logits(model)
    assert apply_peft(model, spec) is model
    assert trainable_parameters(model) == (trainable, total)
    assert torch.equal(logits(model), before)  # zero biases / zero up-projections: exactly the same model
    assert trainable_names(model) == peft_parameter_names(model)
    assert model.config.quantization_config.peft == PeftSpec.from_dict(spec)  # recorded for save_pretrained
    print_trainable_parameters(model)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_structure_names_keep_the_base_names_loadable():
    model = apply_peft(make_tiny_llama(seed=1), {"method": "bitfit"})
    assert trainable_names(model)[:2] == [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.bias",
    ]
    assert len(trainable_names(model)) == 14 and all(n.endswith("_proj.bias") for n in trainable_names(model))
    model = apply_peft(
        make_tiny_llama(seed=1), {"method": "adapters", "adapter_size": 8, "adapter_placement": "houlsby"}
    )
    base_names = set(make_tiny_llama(seed=1).state_dict())
    assert base_names <= set(model.state_dict())  # nothing renamed: the base checkpoint loads by name
    assert trainable_names(model)[:4] == [
        f"model.layers.0.self_attn.adapter.{n}" for n in ("down_weight", "down_bias", "up_weight", "up_bias")
    ]
    assert isinstance(model.model.layers[1].mlp.adapter, BottleneckAdapter)
    assert (
        model.model.layers[0].mlp.adapter.down_weight.std() > 0
        and not model.model.layers[0].mlp.adapter.up_weight.any()
    )
    prompt = IDS[:1, :8]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6, do_sample=False),
        make_tiny_llama(seed=1).generate(prompt, max_new_tokens=6, do_sample=False),
    )
    perturb(model)  # the hooks act in cached decoding exactly as in a full forward
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(cached.logits, dim=1), full, rtol=1e-5, atol=1e-5)
    assert not torch.equal(full, make_tiny_llama(seed=1)(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :])


def test_adapter_is_the_residual_bottleneck():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(64, 8, "silu", init_scale=0.1)
    with torch.no_grad():
        adapter.up_weight.normal_()
        adapter.up_bias.normal_()
    h = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    x = h.float()
    expected = x @ adapter.down_weight.T + adapter.down_bias
    expected = torch.nn.functional.silu(expected) @ adapter.up_weight.T + adapter.up_bias
    out = adapter(h)
    assert out.dtype == torch.bfloat16 and torch.equal(out, h + expected.to(torch.bfloat16))


def test_applying_twice_and_refusals():
    model = apply_peft(make_tiny_llama(seed=1), {"method": "adapters", "adapter_size": 8})
    assert trainable_parameters(apply_peft(model, PeftSpec(method="adapters", adapter_size=8)))[0] == 2 * adapter_numel(
        8
    )
    with pytest.raises(ValueError, match=r"already carries peft method 'adapters'"):
        apply_peft(model, {"method": "bitfit"})
    with pytest.raises(
        ValueError,
        match=r"peft.freeze_layers=3 is larger than the 2 decoder layers of this "
        r"LlamaForCausalLM; allowed values: 0..2",
    ):
        apply_peft(make_tiny_llama(seed=1), {"method": "freeze", "freeze_layers": 3})
    with pytest.raises(
        ValueError,
        match=r"BitFit found no bias in the decoder layers of this LlamaForCausalLM and "
        r"peft.bitfit_add_missing=False",
    ):
        apply_peft(make_tiny_llama(seed=1), {"method": "bitfit", "bitfit_add_missing": False})
    with pytest.raises(ValueError, match=r"peft.bitfit_targets=\['qkv'\] matched no module; nothing would train"):
        apply_peft(make_tiny_llama(seed=1), {"method": "bitfit", "bitfit_targets": ["qkv"]})
    with pytest.raises(ValueError, match=r"matched 2 module\(s\), none with a bias \(bitfit_add_missing=False"):
        apply_peft(
            make_tiny_llama(seed=1), {"method": "bitfit", "bitfit_targets": ["q_proj"], "bitfit_add_missing": False}
        )
    fresh = make_tiny_llama(seed=1)
    with pytest.raises(ValueError, match=r"peft.trainable_modules=\['layer_norm'\] matched no module"):
        apply_peft(fresh, {"method": "adapters", "trainable_modules": ["layer_norm"]})
    assert not hasattr(fresh.model.layers[0].mlp, "adapter")  # a refused spec leaves the model untouched
    with pytest.raises(ValueError, match=r"carries no peft method; call apply_peft"):
        save_peft_weights(fresh, "unused")


# ------------------------------------------------------------------------------ Trainer


def run_trainer(model, tmp_path) -> None:
    """3 AdamW steps of stock Trainer; the loss on a fixed batch falls, frozen tensors stay bit-identical
    and every trained one moves."""
    batch = default_data_collator([Rows()[i] for i in range(4)])
    with torch.no_grad():
        loss_before = model(**batch).loss.item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = set(trainable_names(model))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        dataloader_drop_last=True,
    )
    Trainer(model=model, args=args, train_dataset=Rows()).train()
    model.eval()
    with torch.no_grad():
        assert model(**batch).loss.item() < loss_before - 0.05  # measured: -0.30 .. -0.41
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == trained


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "bitfit"},
        {"method": "freeze", "freeze_layers": 1},
        {"method": "adapters", "adapter_size": 8},
    ],
)
def test_stock_trainer_trains_only_the_method(spec, tmp_path):
    run_trainer(apply_peft(make_tiny_llama(seed=1), spec), tmp_path)


# ------------------------------------------------------------------------------ saving and loading


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "bitfit"},
        {"method": "freeze", "freeze_layers": 1},
        {"method": "adapters", "adapter_size": 8, "adapter_placement": "houlsby"},
    ],
)
def test_from_pretrained_section_save_and_plain_reload(spec, fp_dir, tmp_path):
    base_logits = logits(AutoModelForCausalLM.from_pretrained(fp_dir))
    model, info = AutoModelForCausalLM.from_pretrained(
        fp_dir, efficiency_config={"peft": spec}, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()  # added tensors are expected
    assert torch.equal(logits(model), base_logits)
    assert trainable_names(model) == peft_parameter_names(model)
    perturb(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["peft"] == PeftSpec.from_dict(spec).to_dict() and "quantization" not in saved
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert torch.equal(logits(reloaded), expected)
    assert trainable_names(reloaded) == trainable_names(model)
    assert trainable_parameters(reloaded) == trainable_parameters(model)


def test_apply_peft_then_save_pretrained_reloads_the_structure(tmp_path):
    model = apply_peft(make_tiny_llama(seed=1), {"method": "adapters", "adapter_size": 8})
    perturb(model)
    model.save_pretrained(tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert torch.equal(logits(reloaded), logits(model))
    assert trainable_names(reloaded) == trainable_names(model)


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "bitfit", "bitfit_targets": ["q_proj", "down_proj"]},
        {"method": "freeze", "freeze_layers": 1},
        {"method": "adapters", "adapter_size": 8, "trainable_modules": ["model.norm"]},
    ],
)
def test_save_and_load_peft_weights_only(spec, tmp_path):
    model = apply_peft(make_tiny_llama(seed=1, tie=False), spec)
    perturb(model)
    save_peft_weights(model, tmp_path / "p")
    with safe_open(tmp_path / "p" / PEFT_WEIGHTS_NAME, "pt") as fh:
        assert sorted(fh.keys()) == sorted(peft_parameter_names(model))
    info = json.loads((tmp_path / "p" / PEFT_CONFIG_NAME).read_text())
    assert info["peft"] == PeftSpec.from_dict(spec).to_dict()
    assert info["parameters"] == trainable_parameters(model)[0]
    fresh = make_tiny_llama(seed=1, tie=False)
    assert load_peft_weights(fresh, tmp_path / "p") is fresh
    assert torch.equal(logits(fresh), logits(model))
    assert trainable_names(fresh) == trainable_names(model)


def test_load_peft_weights_refuses_another_model(tmp_path):
    model = apply_peft(make_tiny_llama(seed=1), {"method": "adapters", "adapter_size": 8})
    save_peft_weights(model, tmp_path / "p")
    with pytest.raises(
        ValueError,
        match=r"does not fit this model: missing 4 tensor\(s\) "
        r"\['model.layers.2.mlp.adapter.down_bias', .*unexpected 0",
    ):
        load_peft_weights(make_tiny_llama(seed=1, num_hidden_layers=3), tmp_path / "p")
    with pytest.raises(ValueError, match=r"down_weight has shape \[8, 64\], the model's is \[8, 32\]"):
        load_peft_weights(make_tiny_llama(seed=1, hidden_size=32, intermediate_size=64), tmp_path / "p")
    with pytest.raises(ValueError, match=r"already carries peft method 'bitfit'"):
        load_peft_weights(apply_peft(make_tiny_llama(seed=1), {"method": "bitfit"}), tmp_path / "p")
    with pytest.raises(ValueError, match=r"is not a folder written by save_peft_weights"):
        load_peft_weights(make_tiny_llama(seed=1), tmp_path)


# ------------------------------------------------------------------------------ quantized base


@pytest.mark.parametrize("spec", [{"method": "bitfit"}, {"method": "adapters", "adapter_size": 8}])
def test_quantized_base_with_peft_trains_in_trainer_and_round_trips(spec, fp_dir, tmp_path):
    quantized_logits = logits(AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={"quantization": QUANT}))
    model = AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={"quantization": QUANT, "peft": spec})
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert torch.equal(logits(model), quantized_logits)
    assert model.hf_quantizer.is_qat_trainable
    float_model = apply_peft(make_tiny_llama(seed=1), spec)
    assert trainable_parameters(model) == trainable_parameters(float_model)  # a packed weight counts as in x out
    if spec["method"] == "bitfit":
        assert model.model.layers[0].self_attn.q_proj.bias.requires_grad
    run_trainer(model, tmp_path)  # the packed weights and scales are among the bit-identical tensors
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.equal(logits(reloaded), logits(model))
    assert trainable_names(reloaded) == trainable_names(model)


def test_quantized_base_needs_a_method_for_trainer_and_refuses_freeze(fp_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={"quantization": QUANT})
    assert not model.hf_quantizer.is_qat_trainable
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=model, args=args, train_dataset=Rows())
    apply_peft(model, {"method": "adapters", "adapter_size": 8})  # recorded in the quantizer's config too
    assert model.hf_quantizer.is_qat_trainable and model.config.quantization_config.quantization is not None
    Trainer(model=model, args=args, train_dataset=Rows())
    freeze = {"method": "freeze", "freeze_layers": 1}
    with pytest.raises(
        ValueError,
        match=r"peft method 'freeze' would train 7 quantized linear\(s\) above layer 1 "
        r"\(model.layers.1.self_attn.q_proj, .*integer weights cannot train",
    ):
        AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={"quantization": QUANT, "peft": freeze})
    w8a8 = {
        "quantization": {"bits": 8, "group_size": None, "symmetric": True},
        "activations": {"mode": "dynamic"},
        "peft": {"method": "bitfit"},
    }
    with pytest.raises(
        ValueError,
        match=r"cannot train a model with int8 activations \(model.layers.0.self_attn.q_proj "
        r"and 13 more linears .*the int8 activation path has no backward",
    ):
        AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config=w8a8)
    kept = {**QUANT, "modules_to_not_convert": ["lm_head", "model.layers.1"]}  # the trained layer stays in float
    model = AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={"quantization": kept, "peft": freeze})
    assert trainable_parameters(model)[0] == LAYER + 64
