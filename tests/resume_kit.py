"""What the trainer-resume tests share (tests/distill/test_resume.py, tests/peft/test_resume.py): the data, the
kill after a checkpoint, the training arguments and the bitwise comparison."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

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


def training_args(out, **kw) -> dict:
    """Keyword arguments of a realistic run: accumulation 2, AdamW, warmup + cosine, clipping, a checkpoint
    every ``KILL_AT`` steps, ``STEPS`` steps, seed 0 (``kw`` overrides)."""
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


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    diff = {k: (got[k].float() - want[k].float()).abs().max().item() for k in want if not torch.equal(got[k], want[k])}
    assert not diff, f"max abs differences: {diff}"
