"""The trainers in two processes on the CPU (gloo) train like one process with the two processes' batches.

Each test launches tests/distributed/ddp_worker.py with ``accelerate launch --multi_gpu --num_processes 2``
(torchrun underneath; ``use_cpu=True`` makes the processes a gloo group on the CPU) with 2 rows per process
and step, and once in one process with 4 rows per step, then compares every trainable tensor after 5
AdamW steps with clipping (max |a - b| / max |b| per tensor <= 1e-5), the rows each step trained on (accelerate
gives process i batch 2k + i of the shuffled order, so step k sees the same 4 rows), and the logged losses.
Rows have one length (no padding) and nothing draws random numbers during training (no dropout), so the
processes' per-row means average exactly to the one-process mean.

Launching 2 processes costs about 12 s on 2 cores; the one-process baselines run in this process, each once
per module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from hf_efficiency.distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    MutualDistillationTrainer,
    MutualDistillationTrainingArguments,
)
from hf_efficiency.distill.distributed import check_parallel_setup, ignored_fsdp_request
from hf_efficiency.distill.projections import PROJECTIONS_CONFIG, PROJECTIONS_WEIGHTS

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",  # torchrun; `--cpu --num_processes 2` would start one process (its CPU launcher is mpirun)
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",  # a free port: tests running side by side do not collide
]
STEPS = 5
REL_TOL = 1e-5


# ---------------------------------------------------------------- running the worker


class Run:
    """What one worker run left in its output folder."""

    def __init__(self, out: Path, output: str):
        self.out, self.output = out, output
        self.weights = load_file(str(out / "final.safetensors"))
        self.log = json.loads((out / "log_history.json").read_text())
        self.setup = json.loads((out / "setup.json").read_text())
        self.ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]

    def rows(self) -> dict[int, list[int]]:
        """Step -> the rows it trained on, over all processes."""
        merged: dict[int, list[int]] = {}
        for r in self.ranks:
            for step, rows in r["rows"].items():
                merged.setdefault(int(step), []).extend(rows)
        return {k: sorted(v) for k, v in sorted(merged.items())}

    def logged(self, key: str) -> dict[int, float]:
        return {h["step"]: h[key] for h in self.log if key in h}


def launch(out: Path, work: Path, case: str, processes: int, *extra: str, expect_ok: bool = True) -> Run | str:
    """Run the worker in ``processes`` processes with ``4 // processes`` rows each per step (one process: in
    this one, which saves the seconds a new interpreter spends importing)."""
    worker = ["--case", case, "--out", str(out), "--work", str(work), "--batch", str(4 // processes)]
    worker += ["--steps", str(STEPS), *extra]
    if processes == 1:
        ddp_worker.main(worker)
        return Run(out, "")
    cmd = [*LAUNCH, str(WORKER), *worker]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=WORKER.parents[2])
    output = proc.stdout + proc.stderr
    if not expect_ok:
        assert proc.returncode != 0, output[-3000:]
        return output
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-5000:]}"
    return Run(out, proc.stdout)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, work):
    """``runs(case, processes, *extra)``: a worker run, each distinct one launched once per module."""
    cache: dict[tuple, Run] = {}

    def get(case: str, processes: int, *extra: str) -> Run:
        key = (case, processes, *extra)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{case}-{processes}p")
            cache[key] = launch(out, work, case, processes, *extra)
        return cache[key]

    return get


def relative_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |got - want| / max |want| for every tensor."""
    assert got.keys() == want.keys()
    return {k: ((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want}


def assert_same_training(two: Run, one: Run, tol: float = REL_TOL) -> float:
    """Same rows per step, same trainable tensors (rel ``tol``) and same logged losses; returns the largest
    relative difference."""
    assert len(two.ranks) == 2 and len(one.ranks) == 1
    assert (two.setup["world_size"], one.setup["world_size"], one.setup["distributed_type"]) == (2, 1, "NO")
    assert two.rows() == one.rows() and list(one.rows()) == list(range(1, STEPS + 1))
    assert all(len(rows) == 4 for rows in one.rows().values())
    diffs = relative_differences(two.weights, one.weights)
    worst = max(diffs.values())
    assert worst <= tol, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    for key in ("loss", "grad_norm"):
        a, b = two.logged(key), one.logged(key)
        assert a.keys() == b.keys() == set(range(1, STEPS + 1))
        assert all(abs(a[s] - b[s]) <= tol * abs(b[s]) for s in b), (key, a, b)
    components = sorted({k for h in one.log for k in h if k.startswith("loss_")})
    for key in components:  # logged rounded to 4 decimals: the processes' parts average to the whole
        a, b = two.logged(key), one.logged(key)
        assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 2e-4 * max(1.0, abs(b[s])) for s in b), (key, a, b)
    # logged once per step, by the main process only
    assert sum(line.startswith("{'loss'") for line in two.output.splitlines()) == STEPS
    print(f"max relative difference: {worst:.3g}")
    return worst


# ---------------------------------------------------------------- DDP equivalence


def test_response_and_feature_distillation_ddp_matches_one_process(runs):
    # KL on logits + hidden-state matching through learned projections (student 32 wide, teacher 64):
    # the projections' gradients are averaged over the processes and clipped with the model's
    two, one = runs("distill", 2, "--save_steps", "3"), runs("distill", 1, "--save_steps", "3")
    assert (two.setup["distributed_type"], two.setup["parameter"]) == ("MULTI_CPU", "Parameter")  # DDP, gloo
    assert {k for k in one.weights if k.startswith("projector.")} == {
        "projector.maps.0.weight",
        "projector.maps.1.weight",
    }
    assert {"loss_response", "loss_feature", "loss_lm"} <= set(one.log[0])
    assert_same_training(two, one)


def test_cached_teacher_distillation_ddp_matches_one_process(runs):
    # each process reads the cache rows of its own shard of the dataset (by dataset index)
    two, one = runs("cached", 2), runs("cached", 1)
    assert "loss_response" in one.log[0]
    assert_same_training(two, one)


def test_mutual_distillation_ddp_matches_one_process_and_picks_the_same_teacher(runs):
    # mode "best" re-picks the teacher every 2 steps from the running training losses: summed over the
    # processes, every process picks the one a single process picks
    two, one = runs("mutual", 2, "--mode", "best"), runs("mutual", 1, "--mode", "best")
    assert_same_training(two, one)
    t0, t1, t = two.ranks[0]["mutual"], two.ranks[1]["mutual"], one.ranks[0]["mutual"]
    assert t0 == t1
    assert [r[1] for r in t0] == [r[1] for r in t] and t[-1][1] is not None
    assert [r[3] for r in t0] == [r[3] for r in t]  # token counts: the whole batch, not one process' share
    assert all(abs(x - y) <= 1e-5 * abs(y) for a, b in zip(t0, t) for x, y in zip(a[2], b[2]))


def test_qlora_ddp_matches_one_process(runs):
    # peft LoRA on a 4-bit RTN base (QuantLinear), plain transformers Trainer, gradient checkpointing on
    two, one = runs("qlora", 2), runs("qlora", 1)
    assert all(".lora_" in k for k in one.weights) and len(one.weights) == 2 * 2 * 7
    assert_same_training(two, one)


# ---------------------------------------------------------------- checkpoints and resume


def test_ddp_checkpoint_resume_matches_the_uninterrupted_run(runs, work, tmp_path):
    full = runs("distill", 2, "--save_steps", "3")
    ckpt = full.out / "checkpoint-3"
    # the projections are in each checkpoint (steps 3 and 5), once: written by the main process only
    names = sorted(p.relative_to(full.out).as_posix() for p in full.out.rglob("distill_projections*"))
    assert names == [f"checkpoint-{s}/{f}" for s in (3, 5) for f in (PROJECTIONS_CONFIG, PROJECTIONS_WEIGHTS)]
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]

    resumed = launch(tmp_path / "resumed", work, "distill", 2, "--save_steps", "3", "--resume", str(ckpt))
    diffs = relative_differences(resumed.weights, full.weights)
    assert max(diffs.values()) <= REL_TOL, diffs
    assert "projector.maps.0.weight" in diffs  # restored from the checkpoint (fresh maps would differ)
    # the log of the resumed run: the checkpoint's 3 steps, then its own 2, each once
    assert [h["step"] for h in resumed.log if "loss" in h] == [1, 2, 3, 4, 5]
    assert resumed.logged("loss") == pytest.approx(full.logged("loss"), rel=REL_TOL)
    assert sum(line.startswith("{'loss'") for line in resumed.output.splitlines()) == 2
    assert list(resumed.rows()) == [4, 5] and resumed.rows() == {k: full.rows()[k] for k in (4, 5)}
    print(f"resumed vs uninterrupted: max relative difference {max(diffs.values()):.3g}")


# ---------------------------------------------------------------- FSDP2


def test_fsdp2_student_sharded_at_load_matches_one_process(runs):
    # accelerate's FSDP plugin does not run on the CPU (see the next test); transformers shards a model at load
    # time with fully_shard (DistributedConfig(fsdp_size=2)) on gloo, and DistillationTrainer trains it with
    # the projections outside it. The student's embeddings are untied (see check_parallel_setup).
    fsdp, one = runs("distill", 2, "--fsdp2"), runs("distill", 1, "--save_steps", "3")
    assert fsdp.setup["parameter"] == "DTensor"  # each process holds a shard of every weight
    assert_same_training(fsdp, one)


def test_accelerate_fsdp_on_cpu_runs_as_ddp_and_the_trainer_says_so(tmp_path, work):
    extra = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    out = tmp_path / "fsdp-plugin"
    worker = [str(WORKER), "--case", "distill", "--out", str(out), "--work", str(work), "--batch", "2"]
    cmd = [a for a in LAUNCH if a != "--multi_gpu"] + extra + worker + ["--steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=WORKER.parents[2])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert (proc.stdout + proc.stderr).count("accelerate runs this job as MULTI_CPU without sharding") == 2
    setup = json.loads((out / "setup.json").read_text())
    assert (setup["distributed_type"], setup["parameter"]) == ("MULTI_CPU", "Parameter")  # plain DDP


# ---------------------------------------------------------------- configuration checks (one process)


def _fake_trainer(**kw) -> SimpleNamespace:
    base = dict(
        args=SimpleNamespace(fsdp=""),
        is_fsdp_enabled=False,
        is_deepspeed_enabled=False,
        model=torch.nn.Linear(2, 2),
        accelerator=SimpleNamespace(distributed_type="DistributedType.MULTI_CPU"),
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_an_fsdp_request_that_accelerate_ignores_is_named(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert ignored_fsdp_request(_fake_trainer()) is None
    message = ignored_fsdp_request(_fake_trainer(args=SimpleNamespace(fsdp=["full_shard"])))
    assert message.startswith("FSDP was requested, but accelerate runs this job as MULTI_CPU without sharding")
    assert "DistributedConfig(fsdp_size=N)" in message
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert ignored_fsdp_request(_fake_trainer()) == message
    assert ignored_fsdp_request(_fake_trainer(is_fsdp_enabled=True)) is None
    sharded = torch.nn.Linear(2, 2)
    sharded.is_distributed_loading_by_transformers = True
    assert ignored_fsdp_request(_fake_trainer(model=sharded)) is None


def test_deepspeed_with_learned_projections_is_refused():
    with pytest.raises(ValueError, match="DeepSpeed cannot train the learned feature projections"):
        check_parallel_setup(_fake_trainer(is_deepspeed_enabled=True), has_external_parameters=True)
    check_parallel_setup(_fake_trainer(is_deepspeed_enabled=True), has_external_parameters=False)
    check_parallel_setup(_fake_trainer(), has_external_parameters=True)


def test_a_tied_student_sharded_at_load_is_warned_about(caplog):
    student = make_tiny_llama(seed=2)  # ties its embeddings
    student._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=) sets
    assert student.is_distributed_loading_by_transformers
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            check_parallel_setup(_fake_trainer(model=student), has_external_parameters=False)
            student.config.tie_word_embeddings = False
            check_parallel_setup(_fake_trainer(model=student), has_external_parameters=False)
    finally:
        hf_logging.disable_propagation()
    assert [r.getMessage()[:60] for r in caplog.records] == [
        "The student is sharded at load time (FSDP2) and ties its inp"
    ]


def test_mutual_trainer_refuses_students_sharded_at_load(tmp_path):
    students = [make_tiny_llama(seed=1), make_tiny_llama(seed=2)]
    students[1]._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=) sets
    args = MutualDistillationTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="cannot train students sharded at load time"):
        MutualDistillationTrainer(students, args)


def test_clipping_takes_the_projections_with_the_model(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4, initializer_range=0.2)
    student = make_tiny_llama(seed=2, hidden_size=32, intermediate_size=64).train()
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], feature_weight=0.5, max_grad_norm=0.1
    )
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher)
    x = torch.arange(32).view(2, 16)
    trainer.compute_loss(student, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}).backward()
    model_grads = [p.grad for p in student.parameters() if p.grad is not None]
    proj_grads = [p.grad for p in trainer.projector.parameters()]
    assert len(proj_grads) == 2 and all(g is not None for g in proj_grads)
    norm = lambda gs: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
    want = torch.sqrt(norm(model_grads) ** 2 + norm(proj_grads) ** 2)
    got = trainer._clip_grad_norm(student)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and want > 0.1
    assert norm(model_grads + proj_grads).item() == pytest.approx(0.1, rel=1e-4)  # both clipped, one factor


# ---------------------------------------------------------------- DeepSpeed (when installed)

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


@needs_deepspeed
def test_deepspeed_zero3_with_a_teacher_loaded_under_zero_init_matches_one_process(runs):
    # the trainer loads the teacher from a folder after the training arguments: ZeRO-3 partitions it at load
    # (zero.Init), and the trainer runs it in an optimizer-less DeepSpeed engine that gathers its weights
    common = ("--feature_weight", "0", "--teacher_path")
    zero3 = runs("distill", 2, *common, "--zero", "3")
    assert (zero3.setup["distributed_type"], zero3.setup["teacher"]) == ("DEEPSPEED", "DeepSpeedEngine")
    assert_same_training(zero3, runs("distill", 1, *common))


@needs_deepspeed
def test_deepspeed_refuses_learned_projections(tmp_path, work):
    output = launch(tmp_path / "ds", work, "distill", 2, "--zero", "2", expect_ok=False)
    assert "DeepSpeed cannot train the learned feature projections" in output
