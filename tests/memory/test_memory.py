"""Memory estimator: exact terms, activation rules vs autograd's saved tensors, measured peaks,
the talk's worked example, bad input, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_efficiency.cli import main as cli_main
from hf_efficiency.memory import (
    TrainingSetup,
    estimate_memory,
    format_bytes,
    measure_memory,
    saved_activation_bytes,
)

INT4 = {"quantization": {"bits": 4, "group_size": 32}}


def _talk_config() -> LlamaConfig:
    """A 1.3 B Llama-style model (24 x 2048, 16 heads, 32k vocabulary, tied embeddings)."""
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=True,
    )


def test_talk_worked_example_terms_and_peak():
    """1.3 B parameters, 16-bit, sequence 512, Adam, batch 1: the talk's 1 + 2.6 + 2.6 + 5.2 +
    ~1 GB = 12.4 GB; its "real life about 11 and some" is our peak, because the activations are
    gone before the gradients are complete."""
    b = estimate_memory(
        _talk_config(), "training", dtype="float16", optimizer="adamw", batch_size=1, sequence_length=512, device="cuda"
    )
    n = b.parameters
    assert 1.29e9 < n < 1.31e9 and b.trainable_parameters == n
    assert b.overhead == 1_000_000_000
    assert b.weights - 2 * n < 4096  # plus the rotary frequency buffers
    assert b.gradients == 2 * n and b.optimizer_states == 4 * n
    assert 0.9e9 < b.activations < 1.3e9  # "about 1 GB per sample"
    talk_sum = b.overhead + b.weights + b.gradients + b.optimizer_states + b.activations
    assert talk_sum == pytest.approx(12.4e9, rel=0.03)
    assert 11.0e9 < b.total < 12.0e9
    assert b.total == sum(b.terms().values())
    table = b.table(decimal=True)
    assert "optimizer states" in table and "5.20 GB" in table and "total" in table


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_and_weights_match_the_real_model(tie):
    model = make_tiny_llama(tie=tie)
    b = estimate_memory(model.config, "inference", dtype="float32", device="cpu")
    real = sum(p.numel() for p in model.parameters())
    assert b.parameters == real
    buffers = sum(t.numel() * t.element_size() for t in model.buffers())
    assert b.weights == real * 4 + buffers


def test_quantized_weights_match_the_quantized_model(tmp_path):
    model = make_tiny_llama(intermediate_size=192)
    model.save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, efficiency_config=INT4)
    real = sum(t.numel() * t.element_size() for t in list(q.parameters()) + list(q.buffers()))
    b = estimate_memory(str(tmp_path), "inference", efficiency_config=INT4, device="cpu")
    assert b.weights == real
    assert b.details["quantized_linears"] > 0 and b.parameters == sum(p.numel() for p in model.parameters())


def test_kv_cache_term_is_exact():
    model = make_tiny_llama()
    with torch.no_grad():
        out = model(torch.randint(0, 257, (3, 40)), use_cache=True)
    cache = out.past_key_values
    real = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)
    b = estimate_memory(model.config, "inference", batch_size=3, sequence_length=40, device="cpu")
    assert b.kv_cache == real
    q = estimate_memory(
        model.config, "inference", batch_size=3, sequence_length=40, device="cpu", kv_cache_bits=4, kv_group_size=64
    )
    assert q.kv_cache == round(real / 4 * (0.5 + 4 / 64))


def _saved(model, training, dtype="float32", attn="sdpa", checkpointing=False):
    est = estimate_memory(
        model.config,
        "training",
        dtype=dtype,
        training=training,
        batch_size=2,
        sequence_length=64,
        attn_implementation=attn,
        device="cpu",
        gradient_checkpointing=checkpointing,
    )
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    got = saved_activation_bytes(model, input_ids=torch.randint(0, 257, (2, 64)))
    return est, got


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_activation_rules_match_autograd_full_finetuning(attn, dtype, kv_heads):
    model = make_tiny_llama(attn_implementation=attn, num_key_value_heads=kv_heads).to(getattr(torch, dtype))
    est, got = _saved(model, "full", dtype, attn)
    assert est.activations == pytest.approx(got, rel=0.01)


@pytest.mark.parametrize(
    "targets,dropout",
    [
        (("q_proj", "k_proj", "v_proj", "o_proj"), 0.0),
        (("q_proj", "k_proj", "v_proj", "o_proj"), 0.1),
        ("all-linear", 0.0),
    ],
)
def test_activation_rules_match_autograd_lora(targets, dropout):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama()
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=targets if isinstance(targets, str) else list(targets), lora_dropout=dropout),
    )
    setup = {"method": "lora", "lora_rank": 4, "lora_targets": targets, "lora_dropout": dropout}
    est, got = _saved(peft_model, setup)
    assert est.activations == pytest.approx(got, rel=0.01)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert est.trainable_parameters == trainable


@pytest.mark.parametrize(
    "training",
    [
        {"method": "bitfit"},
        {"method": "adapters", "adapter_size": 16},
        {"method": "adapters", "adapter_size": 16, "adapter_placement": "houlsby", "adapter_nonlinearity": "silu"},
    ],
)
def test_activation_rules_match_autograd_for_our_peft_methods(training):
    from hf_efficiency.peft.methods import apply_peft

    model = apply_peft(make_tiny_llama(num_hidden_layers=3), training)
    est, got = _saved(model, training)
    assert est.activations == pytest.approx(got, rel=0.01)
    assert est.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_activation_rules_match_autograd_qlora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    make_tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, efficiency_config=INT4)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    setup = {"method": "qlora", "lora_rank": 4, "lora_targets": "all-linear"}
    est = estimate_memory(
        peft_model.config,
        "training",
        dtype="float32",
        training=setup,
        efficiency_config=INT4,
        batch_size=2,
        sequence_length=64,
        device="cpu",
    )
    peft_model.train()
    got = saved_activation_bytes(peft_model, input_ids=torch.randint(0, 257, (2, 64)))
    # the quantized base saves what a float base saves: its dequantized weights are never kept
    assert est.activations == pytest.approx(got, rel=0.01)


def test_activation_rules_freeze_lower_layers_and_checkpointing():
    model = make_tiny_llama(num_hidden_layers=4)
    model.model.embed_tokens.requires_grad_(False)
    for layer in model.model.layers[:2]:
        layer.requires_grad_(False)
    est, got = _saved(model, {"method": "freeze", "freeze_layers": 2})
    assert est.activations == pytest.approx(got, rel=0.01)
    assert est.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # checkpointing: the forward keeps each layer's input; one layer is recomputed in backward
    est, got = _saved(make_tiny_llama(num_hidden_layers=4), "full", checkpointing=True)
    assert est.activations - est.details["recomputed_layer_per_sequence"] * 2 == pytest.approx(got, rel=0.1)


def test_optimizer_states_per_optimizer():
    cfg = make_tiny_llama().config
    kw = dict(mode="training", device="cpu", dtype="float32")
    n = estimate_memory(cfg, optimizer="sgd", **kw).trainable_parameters
    assert estimate_memory(cfg, optimizer="adamw", **kw).optimizer_states == 8 * n
    assert estimate_memory(cfg, optimizer="sgd", **kw).optimizer_states == 4 * n
    ada = estimate_memory(cfg, optimizer="adafactor", **kw).optimizer_states
    model = make_tiny_llama()
    factored = sum((p.shape[0] + p.shape[1]) * 4 if p.dim() == 2 else p.numel() * 4 for p in model.parameters())
    assert ada == factored
    eight = estimate_memory(cfg, optimizer="adamw_8bit", **kw).optimizer_states
    assert 2 * n < eight < 3 * n
    foreach = estimate_memory(cfg, optimizer="adamw_foreach", **kw)
    assert foreach.workspace == 4 * n and estimate_memory(cfg, optimizer="adamw", **kw).workspace == 0


def test_mixed_precision_master_weights_and_lora_states():
    cfg = make_tiny_llama().config
    b = estimate_memory(cfg, "training", dtype="bfloat16", mixed_precision="bf16", device="cpu")
    n = b.trainable_parameters
    assert 0 <= b.weights - 2 * n < 4096 and b.gradients == 2 * n  # plus the rotary buffers
    assert b.weight_copies == 4 * n and b.optimizer_states == 8 * n
    lora = estimate_memory(cfg, "training", dtype="bfloat16", training="lora", device="cpu")
    # peft keeps adapters in fp32: 4 bytes of gradient and 8 bytes of AdamW state each
    assert lora.gradients == 4 * lora.trainable_parameters
    assert lora.optimizer_states == 8 * lora.trainable_parameters


def test_qlora_counts_quantized_base_and_fp32_adapters():
    cfg = make_tiny_llama(intermediate_size=192).config
    q = estimate_memory(cfg, "training", dtype="bfloat16", training="qlora", efficiency_config=INT4, device="cpu")
    lora = estimate_memory(cfg, "training", dtype="bfloat16", training="lora", device="cpu")
    assert q.trainable_parameters == lora.trainable_parameters
    assert q.weights < lora.weights


def test_peft_lora_config_is_accepted():
    from peft import LoraConfig

    setup = TrainingSetup.coerce(LoraConfig(r=16, target_modules=["v_proj", "q_proj"], lora_dropout=0.05))
    assert setup.method == "lora" and setup.lora_rank == 16 and setup.lora_targets == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="training", optimizer="lion"), "optimizer='lion' is not allowed; allowed values: adamw"),
        (dict(mode="training", training={"method": "lora", "lora_rank": 100}), "lora_rank=100 is larger than"),
        (dict(mode="training", training="qlora"), "needs a quantized base"),
        (dict(mode="training", training="full", efficiency_config=INT4), "use 'qlora'"),
        (dict(mode="training", training={"method": "bitfit", "bitfit_add_missing": False}), "has none"),
        (dict(mode="training", training={"method": "freeze", "freeze_layers": 3}), "larger than the model's 2"),
        (dict(mode="training", training={"method": "lora", "lora_targets": ("nope",)}), "matched no linear"),
        (dict(mode="train"), "mode='train' is not allowed"),
        (dict(dtype="int8"), "dtype='int8' is not allowed"),
        (dict(batch_size=0), "batch_size=0 is not allowed"),
        (dict(attn_implementation="magic"), "attn_implementation='magic' is not allowed"),
        (dict(device="tpu"), "device='tpu' has no documented overhead"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        estimate_memory(make_tiny_llama().config, **kwargs)


def test_config_without_needed_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert_like_custom"}))
    with pytest.raises(ValueError):
        estimate_memory(str(tmp_path))
    from hf_efficiency.memory.shapes import model_shape

    class Partial:
        model_type = "mystery"
        hidden_size = 64

    with pytest.raises(ValueError, match="lacks num_hidden_layers, num_attention_heads, vocab_size"):
        model_shape(Partial())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        estimate_memory(str(empty))


def test_format_bytes_and_json_round_trip():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(2.6e9, decimal=True) == "2.60 GB"
    b = estimate_memory(make_tiny_llama().config, "training", device="cpu")
    d = json.loads(b.to_json())
    assert d["total"] == b.total == sum(d[k] for k in b.terms())
    assert d["total_without_overhead"] == b.total - b.overhead


def _measure_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        tie_word_embeddings=True,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="inference", batch_size=1, sequence_length=512),
        dict(mode="inference", batch_size=2, sequence_length=256, new_tokens=16),
        dict(mode="training", batch_size=2, sequence_length=256),
        dict(mode="training", batch_size=2, sequence_length=256, training="lora"),
    ],
    ids=["inference", "generate", "full-finetuning", "lora"],
)
def test_estimate_within_15_percent_of_measured_peak(kwargs):
    cfg = _measure_config()
    est = estimate_memory(cfg, device="cpu", **kwargs)
    measured = measure_memory(cfg, device="cpu", isolate=True, **kwargs)
    assert measured.method == "rss_vmhwm_pinned"
    assert measured.resident_after_setup > 0.9 * est.weights
    assert est.total_without_overhead == pytest.approx(measured.peak_bytes, rel=0.15)


def test_cli_estimate_json_compare_and_plot(tmp_path, capsys):
    make_tiny_llama().save_pretrained(tmp_path / "m")
    png = tmp_path / "chart.png"
    code = cli_main(
        [
            "estimate",
            str(tmp_path / "m"),
            "--mode",
            "training",
            "--training",
            "lora",
            "--lora-rank",
            "4",
            "--batch-size",
            "2",
            "--sequence-length",
            "128",
            "--device",
            "cpu",
            "--compare",
            "--plot",
            str(png),
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"]["trainable_parameters"] == 2 * (2 * 4 * (64 + 64) + 2 * 4 * (64 + 32))
    labels = [c["label"] for c in out["compare"]]
    assert labels == [
        "fp32 inference",
        "bf16 inference",
        "int8 inference",
        "int4 inference",
        "full fine-tuning",
        "LoRA r=8",
        "QLoRA r=8",
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = cli_main(["estimate", str(tmp_path / "m"), "--mode", "training", "--training", "lora", "--lora-rank", "99"])
    assert code == 2 and "lora_rank=99 is larger than" in capsys.readouterr().err
    assert cli_main(["estimate", str(tmp_path / "m"), "--bits", "4", "--group-size", "32", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "weights" in text and "KV cache" in text and "total" in text


def test_measure_memory_rejects_bad_input():
    cfg = make_tiny_llama().config
    with pytest.raises(ValueError, match="optimizer='lion' is not allowed"):
        measure_memory(cfg, "training", optimizer="lion", device="cpu")


@pytest.mark.parametrize(
    "training",
    [
        "qlora",
        "bitfit",
        {"method": "adapters", "adapter_size": 16},
        {"method": "adapters", "adapter_size": 16, "adapter_placement": "houlsby"},
    ],
)
def test_measure_memory_builds_every_peft_layout(training):
    cfg = make_tiny_llama().config
    quantized = INT4 if training == "qlora" else None
    measured = measure_memory(
        cfg,
        "training",
        training=training,
        efficiency_config=quantized,
        device="cpu",
        batch_size=1,
        sequence_length=32,
        steps=1,
    )
    estimated = estimate_memory(
        cfg, "training", training=training, efficiency_config=quantized, device="cpu", batch_size=1, sequence_length=32
    )
    assert measured.trainable_parameters == estimated.trainable_parameters


def test_peak_memory_of_sees_a_temporary_allocation():
    from hf_efficiency.memory.measure import peak_memory_of

    def work():
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed before returning
        return float(big[0])

    result, peak, seconds = peak_memory_of(work)
    assert result == 1.0 and seconds >= 0
    assert 60 * 2**20 < peak < 200 * 2**20
