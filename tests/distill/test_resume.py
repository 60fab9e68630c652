"""Resuming the distillation trainers is exact: a run killed right after its step-k checkpoint and resumed
by a new trainer (new model objects, built as a new process would) ends with bit-identical weights.

The setup is a realistic one: shuffled data (the default sampler), attention dropout in the students,
gradient accumulation 2 with a short last accumulation of every epoch, AdamW, warmup + cosine schedule,
gradient clipping, and a run that crosses an epoch boundary after the resume point.

The kill is modelled by an exception raised from ``on_save`` at step k, i.e. right after the checkpoint
is on disk: nothing else of the interrupted run happens (no epoch end, no final save, no callbacks).
``max_steps=k`` is not a faithful model: the optimizer and scheduler in its checkpoint belong to a k-step
schedule (the learning rate stored for the next step is that schedule's last one), so a resume with
``max_steps=n`` differs from a killed n-step run (6e-3 max abs weight difference in the online case).
Stopping through ``control.should_training_stop`` writes the right checkpoint but still runs the
epoch-end callbacks (snapshots, "best" re-picks) that a killed process never runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from conftest import make_tiny_llama
from resume_kit import KILL_AT, STEPS, KillAfterSave, Killed, Rows, assert_same_tensors, training_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_efficiency.distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    MutualDistillationTrainer,
    MutualDistillationTrainingArguments,
    cache_teacher_logprobs,
    list_snapshots,
    make_student,
)
from hf_efficiency.distill.projections import PROJECTIONS_WEIGHTS


def run_interrupted(make_trainer: Callable[[str], object], tmp_path, kill_at: int = KILL_AT):
    """(uninterrupted trainer, resumed trainer, checkpoint folder): the full run, and a run killed after
    its step-``kill_at`` checkpoint then resumed from it by a new trainer."""
    full = make_trainer(str(tmp_path / "full"))
    full.train()
    killed = make_trainer(str(tmp_path / "killed"))
    killed.add_callback(KillAfterSave(kill_at))
    with pytest.raises(Killed):
        killed.train()
    ckpt = str(tmp_path / "killed" / f"checkpoint-{kill_at}")
    # the kill model leaves the checkpoint the uninterrupted run wrote at that step
    for name in ("model.safetensors", "student-0/model.safetensors", "adapter_model.safetensors"):
        if os.path.isfile(os.path.join(ckpt, name)):
            a, b = (
                load_file(os.path.join(ckpt, name)),
                load_file(str(tmp_path / "full" / f"checkpoint-{kill_at}" / name)),
            )
            assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = make_trainer(str(tmp_path / "killed"))
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.state.global_step == full.state.global_step == STEPS
    return full, resumed, ckpt


def trained_state(trainer) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    projector = getattr(trainer, "projector", None)
    if projector is not None:
        out.update({f"projector.{k}": v.detach().clone() for k, v in projector.state_dict().items()})
    return out


def train_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------- DistillationTrainer


def distill_trainer(out: str, student_kw: dict | None = None, **kw) -> DistillationTrainer:
    # attention dropout on: the student draws from the RNG the checkpoint restores (the teacher is in eval mode)
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4, attention_dropout=0.1)
    student = make_tiny_llama(seed=2, **student_kw) if student_kw else make_student(teacher, 2)
    student.train()
    args = DistillationTrainingArguments(**training_args(out, **kw))
    evals = Rows(n=4, length=16) if args.eval_strategy != "no" else None
    return DistillationTrainer(
        model=student, args=args, train_dataset=Rows(), eval_dataset=evals, teacher_model=teacher
    )


@pytest.mark.parametrize(
    "kill_at, kw",
    [(KILL_AT, {}), (4, {}), (4, {"eval_strategy": "epoch"})],
    ids=["mid-epoch", "epoch-boundary", "epoch-boundary-before-the-epoch-evaluation"],
)
def test_online_teacher_resume_is_exact(tmp_path, kill_at, kw):
    # The last case: transformers writes the step-4 checkpoint before the epoch's evaluation, and a run
    # resumed from it starts in epoch 2, so it would skip that evaluation. The evaluation's DataLoader
    # draws a seed from the global RNG, so skipping it changed the later dropout masks (3.8e-3 max abs
    # weight difference) besides losing its log line; the trainer runs it where the killed run would have.
    full, resumed, _ = run_interrupted(
        lambda out: distill_trainer(out, alpha=0.7, temperature=2.0, save_steps=kill_at, **kw), tmp_path, kill_at
    )
    assert_same_tensors(trained_state(resumed), trained_state(full))
    assert train_losses(resumed) == train_losses(full)
    evals = [[(h["step"], h["eval_loss"]) for h in t.state.log_history if "eval_loss" in h] for t in (full, resumed)]
    assert evals[0] == evals[1] == ([(4, evals[0][0][1]), (8, evals[0][1][1])] if kw else [])


def test_feature_projection_resume_is_exact(tmp_path):
    # a narrower student: the learned projections train with the student (their AdamW state included)
    full, resumed, ckpt = run_interrupted(
        lambda out: distill_trainer(
            out,
            student_kw=dict(hidden_size=32, intermediate_size=64),
            feature_weight=0.5,
            relation_weight=0.1,
            relation_losses="rkd_distance,token_similarity",
        ),
        tmp_path,
    )
    assert any(k.startswith("projector.") for k in trained_state(full))
    assert_same_tensors(trained_state(resumed), trained_state(full))
    assert train_losses(resumed) == train_losses(full)
    # a checkpoint without the learned projections does not resume as if it had them
    os.remove(os.path.join(ckpt, PROJECTIONS_WEIGHTS))
    again = distill_trainer(
        str(tmp_path / "again"), student_kw=dict(hidden_size=32, intermediate_size=64), feature_weight=0.5
    )
    with pytest.raises(ValueError, match="holds no learned feature projections"):
        again.train(resume_from_checkpoint=ckpt)


def test_cached_teacher_resume_is_exact(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4)
    cache = cache_teacher_logprobs(teacher, Rows(), tmp_path / "cache", top_k=8, shard_size=5, show_progress=False)

    def make(out: str) -> DistillationTrainer:
        student = make_student(make_tiny_llama(seed=1, num_hidden_layers=4), 2)
        args = DistillationTrainingArguments(**training_args(out, teacher_cache_dir=str(cache), alpha=0.8))
        return DistillationTrainer(model=student, args=args, train_dataset=Rows())

    full, resumed, _ = run_interrupted(make, tmp_path)
    assert_same_tensors(trained_state(resumed), trained_state(full))
    assert train_losses(resumed) == train_losses(full)


@pytest.mark.parametrize(
    "strategy, kill_at, steps",
    [("steps", KILL_AT, (4, 6, 8)), ("epoch", 4, (4, 8))],
    ids=["every-2-steps", "epochs-killed-at-the-boundary"],
)
def test_snapshot_self_distillation_resume_is_exact_and_keeps_every_snapshot(tmp_path, strategy, kill_at, steps):
    full, resumed, _ = run_interrupted(
        lambda out: distill_trainer(
            out, snapshot_strategy=strategy, snapshot_steps=2, snapshot_keep_last=3, save_steps=kill_at
        ),
        tmp_path,
        kill_at,
    )
    assert_same_tensors(trained_state(resumed), trained_state(full))
    folders = [os.path.join(tmp_path, name, "snapshots") for name in ("full", "killed")]
    entries = [[{k: e[k] for k in ("step", "epoch", "path")} for e in list_snapshots(f)] for f in folders]
    assert entries[0] == entries[1]
    assert [e["step"] for e in entries[0]] == list(steps)
    for e in entries[0]:
        a = load_file(os.path.join(folders[0], e["path"], "model.safetensors"))
        b = load_file(os.path.join(folders[1], e["path"], "model.safetensors"))
        assert_same_tensors(b, a)


# ---------------------------------------------------------------- MutualDistillationTrainer


class RecordMutualState(TrainerCallback):
    """After every optimizer step: the teacher index of mode "best" and the running losses its next pick reads."""

    def __init__(self, trainer: MutualDistillationTrainer):
        self.trainer, self.trajectory = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        self.trajectory.append((state.global_step, t.best_index, t._train_ce.tolist(), t._train_n, t._next_exchange))


def mutual_trainer(out: str, **kw) -> MutualDistillationTrainer:
    students = [make_tiny_llama(seed=1, attention_dropout=0.1), make_tiny_llama(seed=2, num_hidden_layers=3)]
    args = MutualDistillationTrainingArguments(**training_args(out, **kw))
    evals = Rows(n=4, length=16) if args.eval_strategy != "no" else None
    trainer = MutualDistillationTrainer(
        students, args, train_dataset=Rows(), eval_dataset=evals, learning_rates=[3e-3, 1e-3]
    )
    trainer.recorder = RecordMutualState(trainer)
    trainer.add_callback(trainer.recorder)
    return trainer


@pytest.mark.parametrize(
    "kw, kill_at",
    [
        (dict(mutual_mode="dml", mutual_weight=0.5, mutual_warmup_steps=5), KILL_AT),
        (dict(mutual_mode="best", exchange_steps=2), KILL_AT),
        (dict(mutual_mode="best", exchange_steps=0), KILL_AT),
        (dict(mutual_mode="best", exchange_steps=0), 4),
        (dict(mutual_mode="best", eval_strategy="epoch"), 4),
    ],
    ids=[
        "dml-warmup",
        "best-every-2-steps",
        "best-at-epoch-end",
        "best-at-epoch-end-killed-at-the-boundary",
        "best-by-epoch-eval-killed-at-the-boundary",
    ],
)
def test_mutual_resume_is_exact(tmp_path, kw, kill_at):
    full, resumed, ckpt = run_interrupted(lambda out: mutual_trainer(out, save_steps=kill_at, **kw), tmp_path, kill_at)
    assert_same_tensors(trained_state(resumed), trained_state(full))
    assert train_losses(resumed) == train_losses(full)
    # the state behind mode "best" follows the same trajectory too (in mode "dml" it is only bookkeeping)
    assert resumed.recorder.trajectory == [r for r in full.recorder.trajectory if r[0] > kill_at]
