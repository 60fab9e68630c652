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

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
) * 4

N_ROWS = 14  # batch 2 -> 7 micro-batches per epoch -> 4 optimizer steps per epoch (the last one accumulates 1)
STEPS = 8  # two epochs
KILL_AT = 3  # mid-epoch: the resumed run skips 6 micro-batches, then crosses the epoch boundary


class Rows(torch.utils.data.Dataset):
    """Byte-token rows of varying content, labels = input_ids."""

    def __init__(self, n: int = N_ROWS, length: int = 20):
        ids = list(TEXT.encode())
        self.rows = [ids[11 * i : 11 * i + length] for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.tensor(self.rows[i])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


class Killed(RuntimeError):
    pass


class KillAfterSave(TrainerCallback):
    """Dies like a killed process right after the checkpoint of step ``step`` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after the checkpoint of step {self.step}")


def common_args(out, **kw) -> dict:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        optim="adamw_torch",
        weight_decay=0.01,
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=KILL_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return base


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


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    diff = {k: (got[k].float() - want[k].float()).abs().max().item() for k in want if not torch.equal(got[k], want[k])}
    assert not diff, f"max abs differences: {diff}"


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
    args = DistillationTrainingArguments(**common_args(out, **kw))
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
        args = DistillationTrainingArguments(**common_args(out, teacher_cache_dir=str(cache), alpha=0.8))
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
    args = MutualDistillationTrainingArguments(**common_args(out, **kw))
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
