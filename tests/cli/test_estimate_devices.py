"""``hf-efficiency estimate --devices N --strategy ...``: the per-device table, the host term, the
``--device-memory`` check naming the term that does not fit, and bad combinations."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from hf_efficiency.cli import build_parser, scenario_from_args
from hf_efficiency.cli import main as cli_main
from hf_efficiency.memory import MemoryScenario, ParallelPlan, estimate_memory, format_bytes

CFG = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
BASE = ["--mode", "training", "--device", "cpu", "--sequence-length", "32"]


@pytest.fixture
def model_dir(tmp_path):
    LlamaConfig(**CFG).save_pretrained(tmp_path)  # the estimator reads config.json only
    return str(tmp_path)


def _row(out: str, title: str) -> str:
    """The value column of the table row ``title``."""
    (line,) = [line for line in out.splitlines() if line.startswith(title + "  ")]
    return line[len(title) :].strip()


def _estimate(model_dir: str, **plan):
    return estimate_memory(model_dir, mode="training", device="cpu", sequence_length=32, parallel=plan)


def test_flags_build_the_plan(model_dir):
    argv = ["estimate", model_dir, *BASE, "--devices", "8", "--strategy", "fsdp-hybrid", "--shard-size", "4"]
    s = scenario_from_args(build_parser().parse_args(argv + ["--tp", "2", "--offload-optimizer"]))
    assert s.parallel_plan == ParallelPlan(
        devices=8, strategy="fsdp-hybrid", shard_size=4, tp=2, offload_optimizer=True
    )
    plain = scenario_from_args(build_parser().parse_args(["estimate", model_dir, *BASE]))
    assert plain.parallel is None and plain == MemoryScenario(mode="training", device="cpu", sequence_length=32)


def test_per_device_table_with_the_host_term(model_dir, capsys):
    argv = ["estimate", model_dir, *BASE, "--devices", "4", "--strategy", "zero3", "--offload-optimizer"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    b = _estimate(model_dir, devices=4, strategy="zero3", offload_optimizer=True)
    assert "training on cpu, per device of zero3 on 4 devices (optimizer offloaded), float32" in out
    assert _row(out, "communication buffers") == format_bytes(b.communication)
    assert _row(out, "host (offloaded)") == f"{format_bytes(b.host)}  (CPU memory, not in total)"
    assert _row(out, "total") == format_bytes(b.total)
    assert not any(line.startswith(("optimizer states", "gradients")) for line in out.splitlines())  # on the host


def test_json_carries_the_plan_and_the_per_device_terms(model_dir, capsys):
    argv = ["estimate", model_dir, *BASE, "--devices", "2", "--strategy", "dp", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)["estimate"]
    b = _estimate(model_dir, devices=2)
    assert out["details"]["parallel"] == ParallelPlan(devices=2).to_dict()
    assert out["communication"] == b.gradients == out["gradients"] and out["total"] == b.total


def test_device_memory_names_the_term_that_does_not_fit(model_dir, capsys):
    argv = ["estimate", model_dir, *BASE, "--overhead-bytes", "0", "--devices", "2", "--strategy", "zero1"]
    assert cli_main(argv + ["--device-memory", "100kB"]) == 2
    err = capsys.readouterr().err
    b = estimate_memory(
        model_dir,
        mode="training",
        device="cpu",
        sequence_length=32,
        overhead_bytes=0,
        parallel={"devices": 2, "strategy": "zero1"},
    )
    assert err.startswith(
        f"hf-efficiency estimate: error: zero1 on 2 devices: weights alone ({format_bytes(b.weights)} per device, "
        f"{format_bytes(b.weights)} with the 0 B runtime overhead) exceed the 97.66 KiB device; "
        "try zero3 / fsdp-full (shards the weights), --tp 2, quantized weights (--bits 8 or 4)"
    )
    assert "per device of zero1 on 2 devices" in err and "total" in err  # the table follows the error
    assert cli_main(argv + ["--device-memory", "1GiB"]) == 0
    assert "fits in the 1.00 GiB device" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--devices", "4", "--tp", "3"], "tp=3 is not allowed; allowed values: divisors of devices=4: 1, 2, 4"),
        (
            ["--devices", "4", "--tp", "4"],
            "tp=4 does not divide num_key_value_heads=2; allowed values: common divisors of",
        ),
        (["--devices", "4", "--strategy", "fsdp-hybrid"], "strategy='fsdp-hybrid' needs shard_size"),
        (
            ["--devices", "4", "--strategy", "fsdp-hybrid", "--shard-size", "3"],
            "shard_size=3 does not divide the 4 data-parallel devices (devices=4 / tp=1); allowed values: 1, 2, 4",
        ),
        (["--devices", "2", "--offload-optimizer"], "offload_optimizer=True needs a strategy that shards"),
        (["--devices", "2", "--strategy", "zero2", "--offload-params"], "offload_params=True needs sharded"),
    ],
)
def test_bad_combinations_name_the_values(model_dir, capsys, flags, message):
    assert cli_main(["estimate", model_dir, *BASE, *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_device_memory_is_an_argument_error(model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["estimate", model_dir, *BASE, "--device-memory", "lots"])
    assert exc.value.code == 2
    assert "device_memory='lots' is not allowed" in capsys.readouterr().err
