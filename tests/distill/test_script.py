"""Smoke tests of integrations/run_clm_distill.py and `hf-efficiency distill` on a tiny teacher."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_byte_tokenizer, make_tiny_llama

from hf_efficiency.cli import main as cli_main
from hf_efficiency.cli.run_clm_distill import main as run_clm_distill

ROOT = Path(__file__).resolve().parents[2]
LINES = [
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
]


@pytest.fixture
def setup(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    make_byte_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "train.txt").write_text("\n".join(LINES * 8) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(LINES[::-1] * 3) + "\n")
    return tmp_path


def _argv(tmp: Path, out: str, *extra: str) -> list[str]:
    return [
        "--teacher_model_name_or_path",
        str(tmp / "teacher"),
        "--train_file",
        str(tmp / "train.txt"),
        "--validation_file",
        str(tmp / "val.txt"),
        "--block_size",
        "32",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--output_dir",
        str(tmp / out),
        "--do_train",
        "--do_eval",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--student_num_layers",
        "2",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def test_run_clm_distill_trains_student_built_from_teacher(setup):
    metrics = run_clm_distill(_argv(setup, "out", "--alpha", "0.7", "--feature_weight", "0.1"))
    assert math.isfinite(metrics["perplexity"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    cfg = json.loads((setup / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["distilled_from_layers"] == [0, 3]
    assert (setup / "out" / "distill_projections.safetensors").is_file()
    assert json.loads((setup / "out" / "eval_results.json").read_text())["perplexity"] == metrics["perplexity"]


def test_run_clm_distill_caches_teacher_then_trains_from_cache(setup):
    cache = setup / "cache"
    only = run_clm_distill(
        _argv(
            setup, "c0", "--teacher_cache_dir", str(cache), "--cache_teacher_top_k", "8", "--cache_teacher_only", "true"
        )
    )
    assert only == {"teacher_cache_dir": str(cache)}
    index = json.loads((cache / "teacher_cache.json").read_text())
    assert index["top_k"] == 8 and index["examples"] > 0
    metrics = run_clm_distill(_argv(setup, "c1", "--teacher_cache_dir", str(cache)))
    assert math.isfinite(metrics["perplexity"])


def test_integration_script_runs_as_a_file(setup):
    script = ROOT / "integrations" / "run_clm_distill.py"
    assert script.is_file()
    proc = subprocess.run(
        [sys.executable, str(script), *_argv(setup, "file", "--max_steps", "1")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (setup / "file" / "model.safetensors").is_file()


def test_cli_distill_wraps_the_script(setup, capsys):
    code = cli_main(
        [
            "distill",
            "--teacher",
            str(setup / "teacher"),
            "--student-layers",
            "2",
            "--max-steps",
            "2",
            "--block-size",
            "32",
            "--batch-size",
            "2",
            "--output-dir",
            str(setup / "cli"),
            "--",
            "--train_file",
            str(setup / "train.txt"),
            "--validation_file",
            str(setup / "val.txt"),
            "--use_cpu",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"student saved to {setup / 'cli'}" in out and "held-out perplexity" in out
    assert (setup / "cli" / "model.safetensors").is_file()


def test_cli_distill_reports_bad_arguments(setup, capsys):
    code = cli_main(["distill", "--teacher", str(setup / "teacher"), "--alpha", "2", "--", "--use_cpu"])
    assert code == 2
    assert "alpha must be in [0, 1], got 2.0" in capsys.readouterr().err
