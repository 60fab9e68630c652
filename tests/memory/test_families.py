"""Memory estimator on every described family: activation rules vs autograd's saved tensors (full fine-tuning
and LoRA, sdpa and eager, float32 and bfloat16), roles from the family description, MoE weights and the MoE
inference peak."""

from __future__ import annotations

import pytest
import torch
from family_models import FAMILIES, VOCAB, family_config
from transformers import AutoConfig, AutoModelForCausalLM

from hf_efficiency.families import family_of
from hf_efficiency.memory import estimate_memory, measure_memory, saved_activation_bytes
from hf_efficiency.memory.shapes import model_shape
from hf_efficiency.memory.training import layer_role

BATCH, SEQ = 2, 64
NO_SDPA = {"gemma2"}  # Gemma 2 soft-caps attention logits: eager only


def _config(model_type: str, attn: str, **overrides):
    """The family matrix's tiny config (`tests/family_models.py`: dropout 0, GQA, sliding windows of 16)."""
    cfg = family_config(model_type, **overrides)
    cfg._attn_implementation = attn
    return cfg


def _cases():
    for model_type in FAMILIES:
        for attn in ("sdpa", "eager"):
            if attn == "sdpa" and model_type in NO_SDPA:
                continue
            for dtype in ("float32", "bfloat16"):
                for training in ("full", "lora-attention", "lora-all-linear"):
                    yield pytest.param(model_type, attn, dtype, training, id=f"{model_type}-{attn}-{dtype}-{training}")


@pytest.mark.parametrize("model_type,attn,dtype,training", list(_cases()))
def test_activation_rules_match_autograd(model_type, attn, dtype, training):
    from peft import LoraConfig, get_peft_model

    cfg = _config(model_type, attn)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    setup = "full"
    if training != "full":
        family = family_of(cfg)
        targets = "all-linear" if training == "lora-all-linear" else family.lora_attention_targets
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=targets if targets == "all-linear" else list(targets))
        )
        setup = {"method": "lora", "lora_rank": 4, "lora_targets": targets}
    est = estimate_memory(
        cfg,
        "training",
        dtype=dtype,
        training=setup,
        batch_size=BATCH,
        sequence_length=SEQ,
        attn_implementation=attn,
        device="cpu",
    )
    model.train()
    got = saved_activation_bytes(model, input_ids=torch.randint(0, VOCAB, (BATCH, SEQ)))
    assert est.activations == pytest.approx(got, rel=0.01)
    assert est.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any("no family description" in n for n in est.notes)


def _peft_cases():
    for model_type in FAMILIES:
        for method in ("bitfit", "adapters", "houlsby", "freeze"):
            if model_type == "opt" and method in ("adapters", "houlsby"):
                continue  # hf_efficiency.peft's adapters find no MLP child in OPT's decoder layer
            yield pytest.param(model_type, method, id=f"{model_type}-{method}")


@pytest.mark.parametrize("model_type,method", list(_peft_cases()))
def test_activation_rules_match_autograd_for_our_peft_methods(model_type, method):
    from hf_efficiency.peft.methods import apply_peft

    training = {
        "bitfit": {"method": "bitfit"},
        "adapters": {"method": "adapters", "adapter_size": 16},
        "houlsby": {"method": "adapters", "adapter_size": 16, "adapter_placement": "houlsby"},
        "freeze": {"method": "freeze", "freeze_layers": 1},
    }[method]
    cfg = family_config(model_type)
    attn = cfg._attn_implementation or "sdpa"
    torch.manual_seed(0)
    model = apply_peft(AutoModelForCausalLM.from_config(cfg), training)
    est = estimate_memory(
        cfg,
        "training",
        training=training,
        batch_size=BATCH,
        sequence_length=SEQ,
        attn_implementation=attn,
        device="cpu",
    )
    model.train()
    got = saved_activation_bytes(model, input_ids=torch.randint(0, VOCAB, (BATCH, SEQ)))
    assert est.activations == pytest.approx(got, rel=0.02)  # rotary tables counted per sequence: +0.5-1.4%
    assert est.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "model_type,relative,param,role",
    [
        ("gpt2", "attn.c_attn", "weight", "attn_in"),
        ("gpt2", "attn.c_proj", "weight", "attn_out"),
        ("gpt2", "mlp.c_fc", "weight", "mlp_in"),
        ("gpt2", "mlp.c_proj", "weight", "mlp_out"),
        ("opt", "self_attn.out_proj", "weight", "attn_out"),
        ("opt", "fc1", "weight", "mlp_in"),
        ("phi3", "mlp.gate_up_proj", "weight", "mlp_in"),
        ("qwen3_moe", "mlp.experts", "gate_up_proj", "expert_in"),
        ("qwen3_moe", "mlp.experts", "down_proj", "expert_out"),
        ("mixtral", "mlp.gate", "weight", "router"),
        ("qwen2_moe", "mlp.shared_expert.up_proj", "weight", "shared_in"),
        ("qwen2_moe", "mlp.shared_expert.down_proj", "weight", "shared_out"),
        ("qwen2_moe", "mlp.shared_expert_gate", "weight", "shared_gate"),
        ("gemma2", "post_feedforward_layernorm", "weight", None),
    ],
)
def test_roles_come_from_the_family_description(model_type, relative, param, role):
    cfg = _config(model_type, "eager")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    from hf_efficiency.families import find_decoder_layers

    layer = find_decoder_layers(model)[1][0]
    shape = model_shape(cfg)
    assert layer_role(relative, layer.get_submodule(relative), shape, family_of(cfg), param) == role


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_moe_weights_count_every_expert(model_type):
    cfg = _config(model_type, "sdpa")
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    est = estimate_memory(cfg, "inference", dtype="float32", device="cpu")
    assert est.weights == real and est.parameters == sum(p.numel() for p in model.parameters())
    shape = model_shape(cfg)
    assert shape.sparse_layers == (0, 1) and shape.top_k == 2 and shape.num_experts == 4


def test_gemma_and_moe_shape_facts():
    gemma2, gemma3 = model_shape(_config("gemma2", "eager")), model_shape(_config("gemma3_text", "sdpa"))
    assert gemma2.attn_softcap and gemma2.final_softcap and not gemma2.qk_norm
    assert gemma3.qk_norm and gemma3.rope_sets == 2 and gemma3.norm == "rms_one_plus" and gemma3.sandwich_norms
    gpt2 = model_shape(_config("gpt2", "sdpa"))
    assert gpt2.fused_qkv and not gpt2.rope and not gpt2.gated_mlp and gpt2.act_saves_other == 3
    assert model_shape(_config("qwen2_moe", "sdpa", mlp_only_layers=[1])).sparse_layers == (0,)


def test_default_lora_targets_are_the_family_attention_projections():
    est = estimate_memory(
        _config("gpt2", "sdpa"), "training", training={"method": "lora", "lora_rank": 4}, device="cpu"
    )
    # c_attn and c_proj (peft's suffix match takes the MLP's c_proj too), per layer: A (r x in) + B (out x r)
    per_layer = 4 * (64 + 192) + 4 * (64 + 64) + 4 * (256 + 64)
    assert est.trainable_parameters == 2 * per_layer


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_inference_estimate_within_10_percent_of_measured_peak(model_type, quantized):
    # quantized: larger experts, so that the 4-bit expert weights (not a constant ~10 MB of CPU GEMM buffers
    # beside the 16 MB of logits) are what the estimate is judged on
    wide = 2 if quantized else 1
    experts = (
        {
            "moe_intermediate_size": 256 * wide,
            "num_experts": 16 * wide,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
        }
        if model_type == "qwen3_moe"
        else {"num_local_experts": 8 * wide, "num_experts_per_tok": 2}
    )
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=512,
        intermediate_size=704 * wide,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=8192,
        tie_word_embeddings=True,
        **experts,
    )
    kwargs = dict(mode="inference", batch_size=1, sequence_length=512, device="cpu")
    if quantized:  # experts become QuantExperts (per-expert 4-bit QuantLinear), attention QuantLinear
        kwargs["efficiency_config"] = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}}
    est = estimate_memory(cfg, **kwargs)
    measured = measure_memory(cfg, isolate=True, **kwargs)
    assert measured.resident_after_setup > 0.9 * est.weights
    assert est.total_without_overhead == pytest.approx(measured.peak_bytes, rel=0.10)
