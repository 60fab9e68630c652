"""Per-device memory of multi-device runs (`ParallelPlan`): validation, round trip, each strategy's
arithmetic term by term, tensor parallel, offload, the fit check, and a 2-process DDP measurement."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, MixtralConfig

from hf_efficiency.memory import (
    DeviceMemoryError,
    MemoryScenario,
    ParallelPlan,
    check_fits,
    estimate_memory,
    format_bytes,
    measure_memory,
    measure_memory_parallel,
)
from hf_efficiency.memory.parallel import parse_memory_size

#: untied, an odd vocabulary (padding when split), 2 key/value heads
CFG = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
TRAIN = dict(mode="training", batch_size=2, sequence_length=32, device="cuda")


def _config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**CFG, **overrides})


def _model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_config(**overrides))


def _buffer_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.buffers())


def _shard(p: torch.Tensor, n: int) -> int:
    """Elements of FSDP2's local shard: dim 0 in ``n`` padded chunks."""
    return math.ceil(p.shape[0] / n) * p[0].numel()


# --- the plan --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(devices=0), "devices=0 is not allowed; allowed values: integers >= 1"),
        (
            dict(strategy="zero4"),
            "strategy='zero4' is not allowed; allowed values: dp, zero1, zero2, zero3, fsdp-full, fsdp-hybrid",
        ),
        (dict(devices=8, tp=3), "tp=3 is not allowed; allowed values: divisors of devices=8: 1, 2, 4, 8"),
        (
            dict(devices=8, strategy="fsdp-hybrid"),
            "strategy='fsdp-hybrid' needs shard_size (the devices one shard group spans, usually a node); "
            "allowed values: divisors of the 8 data-parallel devices: 1, 2, 4, 8",
        ),
        (
            dict(devices=8, tp=2, strategy="fsdp-hybrid", shard_size=3),
            "shard_size=3 does not divide the 4 data-parallel devices (devices=8 / tp=2); allowed values: 1, 2, 4",
        ),
        (
            dict(devices=8, shard_size=4),
            "shard_size=4 applies to strategy='fsdp-hybrid' only (strategy='dp'); allowed values: None",
        ),
        (dict(devices=2, offload_optimizer="yes"), "offload_optimizer='yes' is not allowed; allowed values: True"),
        (
            dict(devices=2, offload_optimizer=True),
            "offload_optimizer=True needs a strategy that shards the optimizer (DDP steps on every device); "
            "allowed strategies: zero1, zero2, zero3, fsdp-full, fsdp-hybrid",
        ),
        (
            dict(devices=2, strategy="zero1", offload_optimizer=True, offload_params=True),
            "offload_params=True needs sharded parameters (strategy='zero1'); "
            "allowed strategies: zero3, fsdp-full, fsdp-hybrid",
        ),
        (dict(devices=2, strategy="zero3", offload_params=True), "offload_params=True needs offload_optimizer=True"),
    ],
)
def test_plan_validation_names_the_field_and_allowed_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        ParallelPlan(**kwargs)
    assert message in str(err.value)
    with pytest.raises(ValueError) as err:  # the same through the scenario
        MemoryScenario(parallel=kwargs)
    assert message in str(err.value)


def test_plan_round_trips_through_the_scenario():
    plan = ParallelPlan(devices=8, strategy="fsdp-hybrid", tp=2, shard_size=2, offload_optimizer=True)
    assert (plan.data_parallel, plan.shard_degree) == (4, 2)
    assert plan.describe() == "fsdp-hybrid on 8 devices (tp 2, shard size 2, optimizer offloaded)"
    assert ParallelPlan(devices=8, strategy="zero3").shard_degree == 8 and ParallelPlan(devices=8).shard_degree == 1
    s = MemoryScenario(mode="training", device="cpu", parallel=plan)
    assert s.parallel == plan.to_dict() and s.parallel_plan == plan
    assert MemoryScenario.from_dict(json.loads(s.to_json())) == s
    assert MemoryScenario(mode="training", device="cpu", parallel=plan.to_json()) == s
    assert MemoryScenario().parallel is None and MemoryScenario().parallel_plan is None
    with pytest.raises(ValueError, match="unknown parallel plan key\\(s\\) 'gpus'; allowed keys: devices, strategy"):
        MemoryScenario(parallel={"gpus": 8})
    with pytest.raises(ValueError, match="parallel=5 is not allowed; allowed values: a ParallelPlan, its dict"):
        MemoryScenario(parallel=5)
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(MemoryScenario).parse_args_into_dataclasses(
        ["--mode", "training", "--device", "cpu", "--parallel", plan.to_json()]
    )
    assert parsed == s


# --- data parallel ---------------------------------------------------------------------------------
def test_one_device_dp_is_the_plain_estimate():
    plain = estimate_memory(_config(), **TRAIN)
    one = estimate_memory(_config(), **TRAIN, parallel=ParallelPlan())
    assert one.to_dict() == plain.to_dict() and one.table() == plain.table()
    assert plain.communication == 0 and plain.host == 0


def test_dp_on_two_devices_adds_the_gradient_buckets():
    plain = estimate_memory(_config(), **TRAIN)
    ddp = estimate_memory(_config(), **TRAIN, parallel={"devices": 2})
    for name, value in plain.terms().items():
        assert getattr(ddp, name) == (value + plain.gradients if name == "communication" else value), name
    assert ddp.communication == plain.gradients > 0
    assert ddp.total == plain.total + plain.gradients
    assert "dp on 2 devices: DDP's gradient buckets" in ddp.notes[-1]
    view = estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "gradient_as_bucket_view": True})
    assert view.total == plain.total and view.communication == 0
    # tp over both devices leaves one data-parallel rank: no DDP, no buckets
    assert estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "tp": 2}).communication == 0


def test_zero1_shards_optimizer_states_by_whole_tensors_like_zero_redundancy_optimizer():
    model = _model()
    sizes = [0, 0]
    for p in sorted(model.parameters(), key=lambda p: p.numel(), reverse=True):  # largest first, to the lighter rank
        sizes[sizes.index(min(sizes))] += p.numel()
    plain = estimate_memory(_config(), **TRAIN)
    b = estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "strategy": "zero1"})
    assert b.details["optimizer_states_per_rank"] == [2 * 4 * n for n in sizes]  # AdamW: two fp32 states
    assert b.optimizer_states == 2 * 4 * max(sizes)
    assert (b.weights, b.gradients, b.communication) == (plain.weights, plain.gradients, plain.gradients)


def test_fsdp_shards_every_parameter_and_gathers_units():
    model, n = _model(), 4
    plan = {"devices": n, "strategy": "fsdp-full"}
    shards = sum(_shard(p, n) for p in model.parameters())
    b = estimate_memory(_config(), **TRAIN, parallel=plan)
    assert b.weights == 4 * shards + _buffer_bytes(model)  # padded dim-0 shards; buffers replicated
    assert b.gradients == 4 * shards and b.optimizer_states == 2 * 4 * shards
    layer = 4 * sum(n * _shard(p, n) for p in model.model.layers[0].parameters())
    tail = 4 * (n * _shard(model.model.norm.weight, n) + n * _shard(model.lm_head.weight, n))
    embed = 4 * n * _shard(model.model.embed_tokens.weight, n)
    assert (b.details["gathered_layer"], b.details["tail_unit"], b.details["embedding_unit"]) == (layer, tail, embed)
    # backward's widest moment: a layer computing, the next prefetched, its unsharded gradients and lm_head's
    # reduce-scatter input (kept until the next reduce-scatter)
    assert b.communication == 3 * layer + tail
    # inference: each unit gathered beside its all-gather output
    inf = estimate_memory(_config(), mode="inference", device="cuda", parallel=plan)
    assert inf.weights == 4 * shards + _buffer_bytes(model) and inf.communication == 2 * layer
    # zero3 is fsdp-full; zero2 keeps every unit gathered from forward to backward: at the last layer's
    # backward the embedding and both layers are still gathered, beside its gradients and lm_head's
    # reduce-scatter input
    assert estimate_memory(_config(), **TRAIN, parallel={**plan, "strategy": "zero3"}).total == b.total
    zero2 = estimate_memory(_config(), **TRAIN, parallel={**plan, "strategy": "zero2"})
    assert zero2.communication == embed + 3 * layer + tail and zero2.weights == b.weights


def test_fsdp_hybrid_shards_within_the_group():
    model = _model()
    hybrid = estimate_memory(_config(), **TRAIN, parallel={"devices": 8, "strategy": "fsdp-hybrid", "shard_size": 2})
    full2 = estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "strategy": "fsdp-full"})
    assert hybrid.to_dict()["total"] == full2.total
    assert hybrid.weights == 4 * sum(_shard(p, 2) for p in model.parameters()) + _buffer_bytes(model)


def test_fsdp_mixed_precision_gathers_in_16_bits_without_autocast_copies():
    fp32 = estimate_memory(_config(), **TRAIN, parallel={"devices": 4, "strategy": "fsdp-full"})
    mp = estimate_memory(_config(), **TRAIN, mixed_precision="bf16", parallel={"devices": 4, "strategy": "fsdp-full"})
    assert mp.weight_copies == 0 and mp.details["gathered_layer"] == fp32.details["gathered_layer"] // 2
    assert mp.communication == fp32.communication // 2
    assert "MixedPrecisionPolicy" in mp.notes[-1] and not any(n.startswith("autocast over") for n in mp.notes)


# --- tensor parallel -------------------------------------------------------------------------------
def test_tp_divides_heads_mlp_and_vocabulary_and_replicates_norms():
    model = _model()
    b = estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "tp": 2})
    rows = math.ceil(259 / 2)  # the vocabulary padded to a multiple of tp, then split
    layer_matrices = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert b.weights == 4 * (layer_matrices // 2 + 2 * rows * 64 + norms) + _buffer_bytes(model)
    assert b.gradients == 4 * (layer_matrices // 2 + 2 * rows * 64 + norms)
    mlp = sum(p.numel() for n, p in model.model.layers.named_parameters() if ".mlp." in n)
    assert b.details["parameters_per_tp_rank"] == b.gradients // 4 and mlp % 2 == 0
    assert b.logits == 2 * 3 * 32 * rows * 4  # vocab-parallel loss buffers
    assert b.parameters == sum(p.numel() for p in model.parameters())  # the header counts the whole model
    plain = estimate_memory(_config(), **TRAIN)
    assert b.activations < plain.activations  # the split parts' activations are divided, the rest is not


@pytest.mark.parametrize(
    "config,plan,message",
    [
        (
            _config(),
            {"devices": 4, "tp": 4},
            "tp=4 does not divide num_key_value_heads=2; allowed values: common divisors of num_attention_heads=4, "
            "num_key_value_heads=2, intermediate_size=128: 1, 2",
        ),
        (
            GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=None, eos_token_id=None),
            {"devices": 2, "tp": 2},
            "tp=2 is not modelled for model type 'gpt2'",
        ),
        (
            MixtralConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                vocab_size=100,
            ),
            {"devices": 2, "tp": 2},
            "tp=2 with a mixture-of-experts model (mixtral) is not modelled",
        ),
    ],
    ids=["kv-heads", "gpt2", "moe"],
)
def test_tp_refuses_what_it_cannot_split(config, plan, message):
    with pytest.raises(ValueError) as err:
        estimate_memory(config, **TRAIN, parallel=plan)
    assert message in str(err.value)


# --- offload ---------------------------------------------------------------------------------------
def test_offload_moves_optimizer_states_master_and_gradients_to_the_host():
    model, n = _model(), 4
    shards = sum(_shard(p, n) for p in model.parameters())
    on = estimate_memory(_config(), **TRAIN, parallel={"devices": n, "strategy": "zero3"})
    off = estimate_memory(_config(), **TRAIN, parallel={"devices": n, "strategy": "zero3", "offload_optimizer": True})
    assert (off.optimizer_states, off.gradients, off.workspace) == (0, 0, 0)
    assert off.host == on.optimizer_states + 4 * shards  # states + the fp32 gradient shard the host steps on
    assert off.weights == on.weights and off.total < on.total and off.host not in off.terms().values()
    assert "host (offloaded)" in off.table()
    # 16-bit weights with fp32 master: the master shard goes to the host too
    bf16 = dict(TRAIN, dtype="bfloat16", mixed_precision="bf16")
    plan = {"devices": n, "strategy": "zero3", "offload_optimizer": True}
    master = estimate_memory(_config(), **bf16, parallel=plan)
    assert master.weight_copies == 0 and master.host == 2 * 4 * shards + 4 * shards + 4 * shards
    params = estimate_memory(_config(), **TRAIN, parallel={**plan, "offload_params": True})
    assert params.weights == _buffer_bytes(model) and params.host == off.host + 4 * shards
    # zero1: DDP keeps the full gradients on the device
    z1 = estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "strategy": "zero1", "offload_optimizer": True})
    plain = estimate_memory(_config(), **TRAIN)
    assert z1.gradients == plain.gradients and z1.optimizer_states == 0
    states = max(z1.details["optimizer_states_per_rank"])  # 2 fp32 states per element, plus its fp32 gradient
    assert z1.host == states + states // 2


# --- does it fit -----------------------------------------------------------------------------------
def test_check_fits_names_the_term_that_does_not_fit():
    b = estimate_memory(_config(), **TRAIN, parallel={"devices": 2, "strategy": "zero1"})
    size = format_bytes
    assert check_fits(b, b.total) is None
    overhead = f"{size(b.overhead)} runtime overhead"
    cap = b.overhead + b.weights - 1
    with pytest.raises(DeviceMemoryError) as err:
        check_fits(b, cap)
    assert str(err.value) == (
        f"zero1 on 2 devices: weights alone ({size(b.weights)} per device, {size(b.overhead + b.weights)} with the "
        f"{overhead}) exceed the {size(cap)} device; try zero3 / fsdp-full (shards the weights), --tp 2, "
        "quantized weights (--bits 8 or 4)"
    )
    states = b.weights + b.optimizer_states
    with pytest.raises(DeviceMemoryError) as err:
        check_fits(b, b.overhead + states - 1)
    assert str(err.value).startswith(
        f"zero1 on 2 devices: weights {size(b.weights)} + optimizer states {size(b.optimizer_states)} = "
        f"{size(states)} per device ({size(b.overhead + states)} with the {overhead}) exceed the "
        f"{size(b.overhead + states - 1)} device; try --offload-optimizer, --tp 2"
    )
    with pytest.raises(DeviceMemoryError) as err:
        check_fits(b, b.total - 1)
    assert f"the step's peak ({size(b.total)} per device with the {overhead}) exceeds" in str(err.value)
    assert b.activations == max(b.activations, b.logits, b.gradients, b.communication)
    assert f"its largest other term: activations ({size(b.activations)}); " in str(err.value)
    assert "try --gradient-checkpointing, a smaller --batch-size or --sequence-length, zero2 / zero3" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_parse_memory_size():
    assert parse_memory_size("80GB") == 80 * 10**9
    assert parse_memory_size("80GiB") == 80 * 2**30
    assert parse_memory_size("512 MiB") == 512 * 2**20
    assert parse_memory_size("1.5TB") == 1_500_000_000_000 and parse_memory_size(4096) == 4096
    with pytest.raises(ValueError, match="device_memory='80 apples' is not allowed; allowed values: a size such as"):
        parse_memory_size("80 apples")


# --- measurement -----------------------------------------------------------------------------------
def test_measurement_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="cannot be measured in one process"):
        measure_memory(_config(), "training", device="cpu", parallel={"devices": 2})
    for plan, message in [
        ({"devices": 1}, "allowed values: a ParallelPlan with devices >= 2"),
        ({"devices": 2, "tp": 2}, "tp=2 cannot be measured"),
        ({"devices": 2, "strategy": "zero3", "offload_optimizer": True}, "cannot be measured on CPU"),
    ]:
        with pytest.raises(ValueError, match=message):
            measure_memory_parallel(_config(), "training", parallel=plan)


def test_ddp_on_two_cpu_processes_within_10_percent_of_the_estimate():
    """Two gloo processes (about 20 s); weights, gradients, AdamW states and DDP's buckets dominate."""
    config = LlamaConfig(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=16000,
    )
    scenario = MemoryScenario(
        mode="training", batch_size=1, sequence_length=64, device="cpu", parallel={"devices": 2, "strategy": "dp"}
    )
    est = estimate_memory(config, scenario)
    ranks = measure_memory_parallel(config, scenario, steps=2)
    assert [m.scenario["rank"] for m in ranks] == [0, 1]
    assert all(m.method == "rss_vmhwm_pinned" for m in ranks)
    for m in ranks:
        assert est.total_without_overhead == pytest.approx(m.peak_bytes, rel=0.10)
