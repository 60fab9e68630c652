"""Online (mutual) distillation: several students trained together, teaching each other.

``mutual_mode="dml"`` is deep mutual learning (Zhang et al., 2018): each student adds ``mutual_weight`` x
the mean KL from its peers' detached distributions to its label loss. ``"best"`` is the talk's variant: periodically the best
student (lowest eval loss, else lowest recent training loss) becomes the teacher of the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainerCallback
from transformers.utils import logging

from .arguments import MutualDistillationTrainingArguments
from .distributed import ignored_fsdp_request, loaded_sharded, sum_across_processes
from .losses import mutual_kl_loss, token_mask
from .trainer import ReplaysMissedEpochEvaluation

logger = logging.get_logger(__name__)

MUTUAL_STATE = "mutual_state.json"


def student_dir(folder: str | os.PathLike, k: int) -> Path:
    """Where student ``k`` of a mutual run is saved inside ``folder`` (a normal HF model folder)."""
    return Path(folder) / f"student-{k}"


class StudentGroup(nn.Module):
    """The students of a mutual run as one module, so ``Trainer`` optimizes, moves and checkpoints them."""

    loss_type = "ForCausalLM"

    def __init__(self, students: Sequence[nn.Module]):
        super().__init__()
        if len(students) < 2:
            raise ValueError(f"Mutual distillation needs at least 2 students, got {len(students)}")
        self.students = nn.ModuleList(students)
        self.config = students[0].config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Every student's output for the same inputs."""
        return [s(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs) for s in self.students]

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        for s in self.students:
            fn = getattr(s, "activation_checkpointing_enable", None) or s.gradient_checkpointing_enable
            fn(**kwargs)


class _PickBestAtEpochEnd(TrainerCallback):
    """The teacher picks of mode "best" that happen at the end of an epoch, made so that a resume keeps them.

    ``Trainer`` writes a ``save_strategy="steps"`` checkpoint at the end of the step that completes an
    epoch, before ``on_epoch_end`` and the epoch's evaluation; a run resumed from it starts in the next
    epoch and never runs those. So:

    * without evaluation or ``exchange_steps`` (pick from the epoch's training loss), the pick is made at
      the end of that step, before its checkpoint (``on_epoch_end`` still picks when training stops
      inside an epoch);
    * with ``eval_strategy="epoch"`` (pick from the eval loss), a run resumed from such a checkpoint
      runs the epoch's evaluation it missed (``ReplaysMissedEpochEvaluation``).
    """

    def __init__(self, trainer: MutualDistillationTrainer):
        self.trainer = trainer

    def _active(self) -> bool:
        a = self.trainer.args
        return a.mutual_mode == "best" and a.exchange_steps == 0 and a.eval_strategy == "no"

    def on_step_end(self, args, state, control, **kwargs):
        if self._active() and state.epoch is not None and float(state.epoch).is_integer():
            self.trainer._pick_best_from_training()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._active():
            self.trainer._pick_best_from_training()  # no-op when on_step_end already picked


class MutualDistillationTrainer(ReplaysMissedEpochEvaluation, Trainer):
    """Trains ``models`` (same or different architectures sharing a vocabulary) together.

    Same constructor as ``Trainer`` except that ``models`` (a list) replaces ``model``, and
    ``learning_rates`` optionally gives each student its own learning rate. Evaluation reports
    ``eval_loss_student_{k}`` per student (``eval_loss`` is their mean); ``save_model(dir)`` writes each
    student as a normal HF model folder ``dir/student-{k}``; checkpoints resume every student.
    """

    loss_is_scaled_for_ga = True
    _tag_names: ClassVar[list[str]] = ["hf-efficiency", "mutual-distillation"]

    def __init__(
        self,
        models: Sequence[PreTrainedModel],
        args: MutualDistillationTrainingArguments | None = None,
        *args_rest: Any,
        learning_rates: Sequence[float] | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = MutualDistillationTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, MutualDistillationTrainingArguments):
            raise TypeError(
                f"MutualDistillationTrainer needs MutualDistillationTrainingArguments, got {type(args).__name__}"
            )
        if learning_rates is not None and len(learning_rates) != len(models):
            raise ValueError(f"learning_rates has {len(learning_rates)} entries for {len(models)} students")
        group = models if isinstance(models, StudentGroup) else StudentGroup(list(models))
        if any(loaded_sharded(s) for s in group.students):
            raise ValueError(
                "MutualDistillationTrainer cannot train students sharded at load time (from_pretrained(..., "
                "distributed_config=...)): Trainer shards or wraps one model, the group of students. Load them "
                "whole and launch with DDP (accelerate launch --multi_gpu)."
            )
        super().__init__(group, args, *args_rest, **kwargs)
        if self.is_deepspeed_enabled and args.max_grad_norm > 0:
            logger.warning(
                "Under DeepSpeed the students' gradients are clipped to one global norm (gradient_clipping), not "
                "each student to its own as without it: set max_grad_norm=0 for the same updates as one process."
            )
        message = ignored_fsdp_request(self)
        if message:
            logger.warning(message)
        self.learning_rates = list(learning_rates) if learning_rates is not None else None
        self.best_index: int | None = None
        self._train_ce = torch.zeros(len(group.students))
        self._train_n = 0
        self._eval_ce = torch.zeros(len(group.students))
        self._eval_n = 0
        self._next_exchange = args.exchange_steps
        self.add_callback(_PickBestAtEpochEnd(self))
        self._track_missed_epoch_evaluation()

    @property
    def students(self) -> list[nn.Module]:
        return list(self.accelerator.unwrap_model(self.model).students)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            group = self.accelerator.unwrap_model(self.model)
            decay = set(self.get_decay_parameter_names(group))
            groups = []
            for k, st in enumerate(group.students):
                lr = self.learning_rates[k] if self.learning_rates else self.args.learning_rate
                for is_decay in (True, False):
                    ps = [
                        p
                        for n, p in st.named_parameters()
                        if p.requires_grad and (f"students.{k}.{n}" in decay) == is_decay
                    ]
                    if ps:
                        groups.append(
                            {"params": ps, "lr": lr, "weight_decay": self.args.weight_decay if is_decay else 0.0}
                        )
            cls, kw = self.get_optimizer_cls_and_kwargs(self.args, group)
            self.optimizer = cls(groups, **kw)
        return self.optimizer

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip each student's gradients on its own, as if it trained alone (one global norm over all
        students would shrink every student's step by the others' gradients); returns the largest
        pre-clip norm."""
        norms = [
            torch.as_tensor(self.accelerator.clip_grad_norm_(st.parameters(), self.args.max_grad_norm))
            for st in self.students
        ]
        return torch.stack([n.float() for n in norms]).max()

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("Mutual distillation trains on labels: the batch has no 'labels'")
        extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
        outs = model(**inputs, **extra)
        ces = torch.stack([o.loss.float() for o in outs])
        mask = token_mask(labels)
        n_tok = int(mask.sum())
        if not model.training:
            self._eval_ce += ces.detach().cpu() * n_tok
            self._eval_n += n_tok
            loss = ces.mean()
            return (loss, outs[self.best_index or 0]) if return_outputs else loss

        a = self.args
        self._add_training_losses(ces, n_tok, num_items_in_batch)
        if a.mutual_mode == "best" and a.exchange_steps and self.state.global_step >= self._next_exchange:
            if self._train_n:
                self._pick_best_from_training()
            self._next_exchange = self.state.global_step + a.exchange_steps
        w = a.mutual_weight
        if a.mutual_warmup_steps:
            w *= min(1.0, (self.state.global_step + 1) / a.mutual_warmup_steps)
        total = ces.new_zeros(())
        for k, o in enumerate(outs):
            if a.mutual_mode == "dml":
                peers = [p.logits.detach() for j, p in enumerate(outs) if j != k]
            elif self.best_index is not None and k != self.best_index:
                peers = [outs[self.best_index].logits.detach()]
            else:
                peers = []
            if peers:
                kl = mutual_kl_loss(
                    o.logits, peers, mask, temperature=a.temperature, num_items_in_batch=num_items_in_batch
                )
                total = total + ces[k] + w * kl
            else:
                total = total + ces[k]
        if num_items_in_batch is None:
            total = total / self.current_gradient_accumulation_steps
        else:
            total = total * self._token_scale()
        return (total, outs) if return_outputs else total

    def _token_scale(self) -> int:
        """What a loss normalized by ``num_items_in_batch`` is multiplied by (as ``Trainer.compute_loss`` does):
        with ``average_tokens_across_devices`` the count covers every process, and DDP averages the
        processes' gradients, so each process scales its share back up."""
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            return self.accelerator.num_processes
        return 1

    def _add_training_losses(
        self, ces: torch.Tensor, n_tok: int, num_items_in_batch: torch.Tensor | int | None
    ) -> None:
        """Add a micro-batch's per-student label-loss sums (and token count) to the running sums that mode
        "best" picks from, summed over the processes so that every process picks the same teacher."""
        # ``ces`` are token sums divided by ``num_items_in_batch`` when it is given, else per-token means
        weight = float(num_items_in_batch) if num_items_in_batch is not None else float(n_tok)
        row = torch.cat([ces.detach() * weight, ces.new_tensor([float(n_tok)])])
        row = sum_across_processes(row.to(self.args.device)).cpu()
        self._train_ce += row[:-1].to(self._train_ce.dtype)
        self._train_n += int(row[-1])

    def _pick_best_from_training(self) -> None:
        if not self._train_n:
            return
        self._set_best((self._train_ce / self._train_n).tolist(), "training loss")
        self._train_ce.zero_()
        self._train_n = 0

    def _set_best(self, losses: list[float], source: str) -> None:
        best = int(torch.tensor(losses).argmin())
        if best != self.best_index:
            logger.info(
                "Mutual distillation: student %d (%s %s) now teaches the others",
                best,
                source,
                [round(x, 4) for x in losses],
            )
        self.best_index = best

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        self._eval_ce.zero_()
        self._eval_n = 0
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # every process evaluated its shard: sum them, so every process reports and picks the same
        row = sum_across_processes(torch.cat([self._eval_ce, torch.tensor([float(self._eval_n)])]).to(self.args.device))
        self._eval_ce, self._eval_n = row[:-1].cpu().to(self._eval_ce.dtype), int(row[-1])
        if self._eval_n:
            per = (self._eval_ce / self._eval_n).tolist()
            extra = {f"{metric_key_prefix}_loss_student_{k}": round(v, 6) for k, v in enumerate(per)}
            metrics.update(extra)
            self.log(extra)
            if self.args.mutual_mode == "best":
                self._set_best(per, "eval loss")
        return metrics

    # ------------------------------------------------------------------ save / resume

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        for k, st in enumerate(self.students):
            st.save_pretrained(student_dir(output_dir, k))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(student_dir(output_dir, k))
        Path(output_dir, MUTUAL_STATE).write_text(
            json.dumps(
                {
                    "num_students": len(self.students),
                    "best_index": self.best_index,
                    "mode": self.args.mutual_mode,
                    # the running training losses the next "best" pick reads, and when it happens:
                    # without them a resumed run re-picks at once from the few batches it has seen
                    "train_loss_sums": self._train_ce.tolist(),  # float32 values: exact as JSON doubles
                    "train_tokens": self._train_n,
                    "next_exchange": self._next_exchange,
                },
                indent=2,
            )
        )
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        state_file = Path(resume_from_checkpoint, MUTUAL_STATE)
        if not state_file.is_file():
            raise ValueError(f"{resume_from_checkpoint} is not a mutual-distillation checkpoint (no {MUTUAL_STATE})")
        state = json.loads(state_file.read_text())
        if state["num_students"] != len(self.students):
            raise ValueError(f"Checkpoint has {state['num_students']} students; this run has {len(self.students)}")
        for k, st in enumerate(self.students):
            loaded = AutoModelForCausalLM.from_pretrained(
                student_dir(resume_from_checkpoint, k), dtype=next(st.parameters()).dtype
            )
            st.load_state_dict(loaded.state_dict())
        self.best_index = state.get("best_index")
        if "train_loss_sums" in state:
            self._train_ce = torch.tensor(state["train_loss_sums"], dtype=self._train_ce.dtype)
            self._train_n = int(state["train_tokens"])
            self._next_exchange = int(state["next_exchange"])
        elif self.args.mutual_mode == "best":
            logger.warning(
                "%s has no running training losses (written by an older version): the next teacher pick "
                "reads only the batches seen after the resume",
                resume_from_checkpoint,
            )
        logger.info("Resumed %d students from %s", len(self.students), resume_from_checkpoint)
