"""peft's LoRA, IA3 and prompt tuning on hf-efficiency's quantized models (QLoRA), merging through the
quantized scheme, and the re-quantization it uses."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_tiny_llama
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_efficiency.peft import prepare_model_for_kbit_training
from hf_efficiency.peft.ia3 import QuantIA3Linear
from hf_efficiency.peft.lora import QuantLoraLinear
from hf_efficiency.quant.core.requantize import requantize_weight
from hf_efficiency.quant.core.scheme import quantize_weight
from hf_efficiency.quant.modules.linear import QuantLinear

Q4 = {"quantization": {"bits": 4, "group_size": 32}}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(seed=3, initializer_range=0.1).save_pretrained(path)
    return str(path)


def quantized(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, efficiency_config={**Q4, **kwargs}).eval()


def ids(seed=0, shape=(2, 24)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def quant_state(model):
    return {n: t.detach().clone() for n, t in model.named_parameters() if ".lora_" not in n and "ia3_l" not in n}


def train_steps(model, steps=4, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    x = ids(1, (4, 32))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return model.eval(), losses


# --- re-quantization --------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_refit_is_never_worse_than_a_fresh_grid_or_the_old_grid_and_is_exact_without_a_change(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.05
    q = quantize_weight(w, 4, 32, symmetric)
    base = q.dequantize()
    same = requantize_weight(base, bits=4, group_size=32, symmetric=symmetric, scale=q.scale, minimum=q.minimum)
    assert torch.equal(same.dequantize(), base)
    target = base + torch.randn(48, 96, generator=g) * 0.004  # a delta far below one step (about 0.02)
    err = {
        m: float(
            (
                (
                    requantize_weight(
                        target, bits=4, group_size=32, symmetric=symmetric, scale=q.scale, minimum=q.minimum, method=m
                    ).dequantize()
                    - target
                )
                ** 2
            ).sum()
        )
        for m in ("refit", "rtn")
    }
    old_grid = float(((base - target) ** 2).sum())  # rounding on the old grid gives back the base here
    assert err["refit"] <= min(err["rtn"], old_grid), (err, old_grid)
    assert err["refit"] < 0.9 * old_grid, (err, old_grid)
    with pytest.raises(ValueError, match="needs the previous scale"):
        requantize_weight(target, bits=4, group_size=32, symmetric=symmetric)
    with pytest.raises(ValueError, match="method='gptq' is not allowed"):
        requantize_weight(target, bits=4, group_size=32, symmetric=symmetric, scale=q.scale, method="gptq")


# --- LoRA -------------------------------------------------------------------------------------------
def test_all_linear_lora_on_quantlinear_trains_with_trainer_and_leaves_the_base_untouched(saved, tmp_path):
    base = quantized(saved)
    # after any from_pretrained peft's own name is ours (a name bound earlier: import it from hf_efficiency.peft)
    assert peft.prepare_model_for_kbit_training is prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(base)
    assert model.is_activation_checkpointing  # peft does this only for quantizers it knows; we teach it ours
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_scale.dtype == torch.float16  # peft would have cast it to float32
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, QuantLoraLinear)}
    assert wrapped == set(LINEARS)
    assert not isinstance(peft_model.base_model.model.lm_head, QuantLoraLinear)
    cfg = model.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.hidden_size // 4
    per_layer = 4 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))  # r x (in + out) per module
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == cfg.num_hidden_layers * per_layer
    before = quant_state(peft_model)
    x = ids(1, (8, 32))
    data = [{"input_ids": r, "labels": r} for r in x]
    args = TrainingArguments(
        str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=3,
        learning_rate=3e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    after = quant_state(peft_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_adapter_round_trip_merge_unmerge_and_merged_checkpoint(saved, tmp_path):
    peft_model, _ = train_steps(
        get_peft_model(quantized(saved), LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    )
    x = ids(2)
    with torch.no_grad():
        ref = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized(saved), tmp_path / "adapter")  # no custom-module glue
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, ref)

    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    pre = {n: t.clone() for n, t in base.named_parameters()}
    exact = base.dequantize_weight() + layer.get_delta_weight("default")
    errors = {}
    for method in ("rtn", "refit"):
        QuantLoraLinear.merge_method = method
        try:
            layer.merge()
            errors[method] = float(((base.dequantize_weight() - exact) ** 2).sum())
            layer.unmerge()
        finally:
            QuantLoraLinear.merge_method = "refit"
        assert all(torch.equal(pre[n], t) for n, t in base.named_parameters())  # unmerge is exact
    assert errors["refit"] < errors["rtn"], errors

    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        out = merged(x).logits
    # the merge keeps most of what the adapter changed
    assert (out - ref).abs().mean() < 0.5 * (base_logits - ref).abs().mean()
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)


def test_lora_bad_input(saved):
    with pytest.raises(ValueError, match="supports plain LoRA and rsLoRA; use_dora"):
        get_peft_model(quantized(saved), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="positive integer"):
        get_peft_model(quantized(saved), LoraConfig(r=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(quantized(saved), LoraConfig(r=4, target_modules=["no_such_proj"]))


# --- IA3 and prompt tuning --------------------------------------------------------------------------
def test_ia3_output_scaling_merges_into_the_scales_and_input_scaling_requantizes(saved):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = get_peft_model(quantized(saved), config)
    layers = [m for m in model.modules() if isinstance(m, QuantIA3Linear)]
    assert len(layers) == 6 and sum(m.is_feedforward for m in layers) == 2
    model, losses = train_steps(model, lr=2e-2)
    assert losses[-1] < losses[0]
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    base = v_proj.get_base_layer()
    codes_before = base.weight.clone()
    h = torch.randn(2, 5, v_proj.in_features, generator=torch.Generator().manual_seed(4))
    x = ids(3)
    with torch.no_grad():
        ref_v, ref = v_proj(h), model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
        model.base_model.merge_adapter()
        # output scaling: only the row scales and minima change, exactly up to their float16 rounding
        assert torch.equal(base.weight, codes_before)
        assert (v_proj(h) - ref_v).abs().max() < 2e-3 * ref_v.abs().max()  # measured 0.8e-3
        merged = model(x).logits
        model.base_model.unmerge_adapter()
        assert torch.equal(model(x).logits, ref)
    assert (merged - ref).abs().mean() < 0.5 * (plain - ref).abs().mean()


def test_prompt_tuning_on_a_quantized_base(saved):
    model = get_peft_model(quantized(saved), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 6 * model.config.hidden_size
    before = quant_state(model)
    model, losses = train_steps(model, lr=5e-2)
    assert losses[-1] < losses[0]
    after = quant_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before if "prompt_encoder" not in n)


def test_qalora_on_quantlinear_merges_exactly_into_the_minima(saved, tmp_path):
    config = LoraConfig(r=4, target_modules="all-linear", use_qalora=True, qalora_group_size=32)
    model, losses = train_steps(get_peft_model(quantized(saved), config), lr=2e-2)
    assert losses[-1] < losses[0]
    layer = model.base_model.model.model.layers[0].mlp.down_proj  # in_features 128: four pooled groups
    assert layer.lora_A["default"].weight.shape == (4, 128 // 32)
    x = ids(5)
    with torch.no_grad():
        ref = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    codes = {n: m.get_base_layer().weight.clone() for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}
    merged = model.merge_and_unload()
    assert all(
        torch.equal(merged.get_submodule(n.replace("base_model.model.", "", 1)).weight, c) for n, c in codes.items()
    )  # only the minima moved
    with torch.no_grad():
        out = merged(x).logits
    # exact up to the float16 rounding of the minima, against a change of the logits that is ~100x larger
    assert (out - ref).abs().max() < 0.01 * (plain - ref).abs().max(), (
        (out - ref).abs().max(),
        (plain - ref).abs().max(),
    )
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(x).logits, out)
