"""`MemoryScenario`: validation, round trip, HfArgumentParser, and the one scenario that
`estimate_memory`, `measure_memory` and `hf-efficiency estimate` share."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_tiny_llama

import hf_efficiency
from hf_efficiency.cli import build_parser, scenario_from_args
from hf_efficiency.cli import main as cli_main
from hf_efficiency.memory import MemoryScenario, TrainingSetup, estimate_memory, measure_memory, standard_breakdowns

INT4 = {"quantization": {"bits": 4, "group_size": 32}}


def test_exported_from_the_package():
    assert hf_efficiency.MemoryScenario is MemoryScenario and "MemoryScenario" in hf_efficiency.__all__


def test_normalizes_and_round_trips():
    s = MemoryScenario(
        mode="training",
        dtype=torch.bfloat16,
        batch_size=2,
        sequence_length=64,
        training={"method": "qlora", "lora_rank": 4, "lora_targets": ["q_proj", "v_proj"]},
        efficiency_config=json.dumps(INT4),
        mixed_precision="bf16",
        gradient_checkpointing=True,
        device="cpu",
    )
    assert s.dtype == "bfloat16"
    assert s.training == TrainingSetup(method="qlora", lora_rank=4, lora_targets=("q_proj", "v_proj"))
    assert s.efficiency_config["quantization"]["bits"] == 4 and s.efficiency.quantization.group_size == 32
    assert s.training_setup is s.training and dataclasses.replace(s, mode="inference").training_setup is None
    text = s.to_json()
    back = MemoryScenario.from_dict(json.loads(text))
    assert back == s and back.to_dict() == s.to_dict()
    assert MemoryScenario().to_dict() == MemoryScenario.from_dict(MemoryScenario().to_dict()).to_dict()
    # an EfficiencyConfig object and a training JSON object are accepted too
    from hf_efficiency import EfficiencyConfig

    same = MemoryScenario(
        mode="training",
        dtype="bfloat16",
        batch_size=2,
        sequence_length=64,
        training='{"method": "qlora", "lora_rank": 4, "lora_targets": ["q_proj", "v_proj"]}',
        efficiency_config=EfficiencyConfig(**INT4),
        mixed_precision="bf16",
        gradient_checkpointing=True,
        device="cpu",
    )
    assert same == s


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="train"), "mode='train' is not allowed; allowed values: inference, training"),
        (dict(dtype="int8"), "dtype='int8' is not allowed; allowed values: auto, float32"),
        (dict(dtype=torch.int8), "dtype=torch.int8 is not allowed; allowed values: float32, float16, bfloat16"),
        (dict(batch_size=0), "batch_size=0 is not allowed; allowed values: integers >= 1"),
        (dict(sequence_length=2.5), "sequence_length=2.5 is not allowed; allowed values: integers >= 1"),
        (dict(new_tokens=-1), "new_tokens=-1 is not allowed; allowed values: integers >= 0"),
        (dict(optimizer="lion"), "optimizer='lion' is not allowed; allowed values: adamw, adamw_foreach"),
        (dict(mixed_precision="fp8"), "mixed_precision='fp8' is not allowed; allowed values: None, bf16, fp16"),
        (dict(gradient_checkpointing="yes"), "gradient_checkpointing='yes' is not allowed; allowed values: True"),
        (dict(attn_implementation="magic"), "attn_implementation='magic' is not allowed; allowed values: eager"),
        (dict(kv_cache_bits=3), "kv_cache_bits=3 is not allowed; allowed values: None, 8, 4, 2"),
        (dict(kv_group_size=0), "kv_group_size=0 is not allowed; allowed values: integers >= 1"),
        (dict(overhead_bytes=-1), "overhead_bytes=-1 is not allowed; allowed values: integers >= 0"),
        (dict(device="tpu"), "device='tpu' has no documented overhead; allowed values: cuda, cpu"),
        (dict(training="dpo"), "training method 'dpo' is not allowed; allowed values: full, lora"),
        (dict(efficiency_config="{bits: 4"), "efficiency_config='{bits: 4' is not allowed; allowed values: a dict"),
        (dict(efficiency_config={"quantization": {"bits": 5}}), "quantization.bits=5 is not allowed"),
        (dict(mode="training", training="qlora"), "training='qlora' needs a quantized base"),
        (dict(mode="training", efficiency_config=INT4), "training='full' updates quantized weights"),
    ],
)
def test_validation_names_the_field_and_allowed_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        MemoryScenario(**kwargs)
    assert message in str(err.value)


def test_devices_unknown_keys_and_build():
    assert MemoryScenario(device="cuda:1").device_type == "cuda"
    assert MemoryScenario(device="xpu", overhead_bytes=0).device == "xpu"
    with pytest.raises(ValueError, match="unknown memory scenario key\\(s\\) 'seq'; allowed keys: mode, dtype"):
        MemoryScenario.from_dict({"seq": 3})
    base = MemoryScenario(batch_size=3, device="cpu")
    assert MemoryScenario.build(base) is base
    assert MemoryScenario.build(base, batch_size=4) == dataclasses.replace(base, batch_size=4)
    assert MemoryScenario.build("training", device="cpu") == MemoryScenario(mode="training", device="cpu")
    assert MemoryScenario.build({"mode": "training"}, device="cpu").mode == "training"
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) 'colour'"):
        MemoryScenario.build(colour="red")
    with pytest.raises(TypeError, match="mode given twice"):
        MemoryScenario.build("training", mode="inference")


def test_hf_argument_parser_builds_the_scenario():
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(MemoryScenario).parse_args_into_dataclasses(
        [
            "--mode",
            "training",
            "--training",
            "qlora",
            "--efficiency_config",
            json.dumps(INT4),
            "--batch_size",
            "2",
            "--gradient_checkpointing",
            "--device",
            "cpu",
            "--kv_cache_bits",
            "4",
        ]
    )
    assert parsed == MemoryScenario(
        mode="training",
        training="qlora",
        efficiency_config=INT4,
        batch_size=2,
        gradient_checkpointing=True,
        device="cpu",
        kv_cache_bits=4,
    )
    (default,) = HfArgumentParser(MemoryScenario).parse_args_into_dataclasses([])
    assert default == MemoryScenario()


def test_scenario_object_equals_keyword_arguments_in_the_estimator():
    cfg = make_tiny_llama().config
    fields = dict(mode="training", training="lora", batch_size=2, sequence_length=32, device="cpu", optimizer="sgd")
    s = MemoryScenario(**fields)
    assert estimate_memory(cfg, s).to_dict() == estimate_memory(cfg, **fields).to_dict()
    assert (
        estimate_memory(cfg, s, batch_size=3).to_dict() == estimate_memory(cfg, **{**fields, "batch_size": 3}).to_dict()
    )
    # a mode name as second argument, as before
    assert (
        estimate_memory(cfg, "training", device="cpu").to_dict()
        == estimate_memory(cfg, MemoryScenario(mode="training", device="cpu")).to_dict()
    )


@pytest.mark.parametrize(
    "scenario",
    [
        MemoryScenario(mode="inference", batch_size=1, sequence_length=32, device="cpu"),
        MemoryScenario(mode="training", training="lora", batch_size=1, sequence_length=32, device="cpu"),
        MemoryScenario(mode="training", training="qlora", efficiency_config=INT4, sequence_length=32, device="cpu"),
    ],
    ids=["inference", "lora", "qlora"],
)
def test_estimate_and_measure_run_the_same_scenario_object(scenario):
    cfg = make_tiny_llama(intermediate_size=192).config
    est = estimate_memory(cfg, scenario)
    measured = measure_memory(cfg, scenario, steps=1)
    assert measured.device == "cpu" == est.device
    assert measured.trainable_parameters == est.trainable_parameters
    record = measured.scenario
    for key in ("mode", "dtype", "batch_size", "sequence_length", "new_tokens", "optimizer", "device"):
        assert record[key] == getattr(scenario, key)
    assert record["efficiency_config"] == scenario.efficiency_config
    assert record["training"] == (None if scenario.mode == "inference" else dataclasses.asdict(scenario.training))
    assert measured.peak_bytes > 0 and measured.resident_after_setup > 0


def test_measure_refuses_what_it_cannot_run():
    cfg = make_tiny_llama().config
    with pytest.raises(ValueError, match="kv_cache_bits=4 cannot be measured"):
        measure_memory(cfg, MemoryScenario(kv_cache_bits=4, device="cpu"))
    with pytest.raises(ValueError, match="training='qlora' needs a quantized base"):
        measure_memory(cfg, "training", training="qlora", device="cpu")
    with pytest.raises(ValueError, match="steps=0 is not allowed"):
        measure_memory(cfg, MemoryScenario(device="cpu"), steps=0)


def test_standard_breakdowns_take_the_common_fields_of_a_scenario():
    cfg = make_tiny_llama().config
    s = MemoryScenario(batch_size=3, sequence_length=40, device="cpu", optimizer="sgd", dtype="float16")
    via_scenario = standard_breakdowns(cfg, s)
    via_kwargs = standard_breakdowns(cfg, batch_size=3, sequence_length=40, device="cpu", optimizer="sgd")
    assert [b.to_dict() for b in via_scenario] == [b.to_dict() for b in via_kwargs]
    assert {b.batch_size for b in via_scenario} == {3} and via_scenario[0].dtype == "float32"


def test_cli_estimate_builds_one_scenario(tmp_path, capsys):
    make_tiny_llama().save_pretrained(tmp_path / "m")
    argv = [
        "estimate",
        str(tmp_path / "m"),
        "--mode",
        "training",
        "--training",
        "qlora",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--batch-size",
        "2",
        "--sequence-length",
        "64",
        "--optimizer",
        "adamw_foreach",
        "--gradient-checkpointing",
        "--kv-group-size",
        "32",
        "--device",
        "cpu",
    ]
    scenario = scenario_from_args(build_parser().parse_args(argv))
    assert scenario == MemoryScenario(
        mode="training",
        training={"method": "qlora", "lora_rank": 4, "lora_targets": ("q_proj", "v_proj")},
        efficiency_config={"quantization": {"bits": 4, "group_size": 32, "symmetric": False, "outliers": 0.0}},
        batch_size=2,
        sequence_length=64,
        optimizer="adamw_foreach",
        gradient_checkpointing=True,
        kv_group_size=32,
        device="cpu",
    )
    assert cli_main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"] == estimate_memory(str(tmp_path / "m"), scenario, label="requested").to_dict()
    # the library's validation answers for the command line
    assert cli_main(["estimate", str(tmp_path / "m"), "--device", "tpu"]) == 2
    assert "device='tpu' has no documented overhead" in capsys.readouterr().err
    assert cli_main(["estimate", str(tmp_path / "m"), "--device", "cpu", "--kv-cache-bits", "4", "--measure"]) == 2
    assert "kv_cache_bits=4 cannot be measured" in capsys.readouterr().err
