"""Save model snapshots during training (for snapshot ensembles) and list them afterwards.

:class:`SnapshotCallback` writes ``snapshot-{global_step:06d}`` folders (regular
``save_pretrained`` folders, loadable with ``AutoModelForCausalLM.from_pretrained``; adapters only
for a peft model) plus an index ``snapshots.json``::

    [{"step": 200, "epoch": 1.0, "path": "snapshot-000200", "eval_loss": 2.31}, ...]

``path`` is relative to the snapshot folder. :func:`list_snapshots` reads the index back, oldest
first; :meth:`hf_efficiency.distill.ensemble.StudentEnsemble.from_snapshots` builds an ensemble
from it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

INDEX_FILE = "snapshots.json"
SNAPSHOT_PREFIX = "snapshot-"


def snapshot_name(step: int) -> str:
    """Folder name of the snapshot taken at global step ``step``."""
    return f"{SNAPSHOT_PREFIX}{int(step):06d}"


def list_snapshots(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``folder/snapshots.json``, oldest first (``path`` is relative to ``folder``)."""
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no {INDEX_FILE} in {folder!r}: not a SnapshotCallback folder")
    with open(index, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise TypeError(f"{index} should hold a list of snapshot entries")
    return sorted(entries, key=lambda e: e["step"])


def _write_index(folder: str, entries: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".snapshots-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, INDEX_FILE))


def _latest_eval_loss(log_history: list[dict[str, Any]], step: int) -> float | None:
    loss = None
    for record in log_history:
        if "eval_loss" in record and record.get("step", 0) <= step:
            loss = float(record["eval_loss"])
    return loss


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel / torch.compile wrappers keep the real model in `.module` / `._orig_mod`
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class SnapshotCallback(TrainerCallback):
    """Save the trained model every ``every_n_steps`` global steps, or at every epoch end when it is None
    (taken at the end of the optimizer step that completes the epoch, before that step's checkpoint, so a
    run killed after the checkpoint and resumed from it has the snapshot too).

    Snapshots go to ``output_dir`` (default ``<args.output_dir>/snapshots``) as
    ``snapshot-{global_step:06d}`` folders written with ``model.save_pretrained(folder,
    safe_serialization=True)`` (for a peft model: the adapters), together with the tokenizer when the
    Trainer has one. Only the main process writes. A snapshot folder that already exists is not
    rewritten (resumed runs). ``snapshots.json`` records ``step``, ``epoch``, relative ``path`` and
    ``eval_loss`` (the latest evaluation at or before the step; updated when the Trainer evaluates at
    the snapshot's step). ``keep_last`` keeps only the newest snapshots (older folders are deleted).
    Not for sharded training (FSDP / ZeRO-3), where rank 0 alone cannot see full weights.
    """

    def __init__(
        self, every_n_steps: int | None = None, output_dir: str | None = None, keep_last: int | None = None
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
        self.every_n_steps = every_n_steps
        self.output_dir = output_dir
        self.keep_last = keep_last
        self._last_step: int | None = None  # global step of the last snapshot this callback took

    def snapshot_dir(self, args: TrainingArguments) -> str:
        """The folder holding the snapshots and ``snapshots.json``."""
        return self.output_dir or os.path.join(args.output_dir, "snapshots")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.every_n_steps is not None:
            due = state.global_step > 0 and state.global_step % self.every_n_steps == 0
        else:
            # The step that completes an epoch: snapshot it here, before the Trainer writes this step's
            # checkpoint. ``on_epoch_end`` comes after that checkpoint, and a run resumed from it starts in
            # the next epoch, so a snapshot taken only there is lost when the run is killed in between.
            due = state.epoch is not None and state.global_step > 0 and float(state.epoch).is_integer()
        if due:
            self._snapshot(args, state, kwargs.get("model"), kwargs.get("processing_class"))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # training stopped inside an epoch (max_steps); an epoch that ran to its end was taken at its last step
        if self.every_n_steps is None and self._last_step != state.global_step:
            self._snapshot(args, state, kwargs.get("model"), kwargs.get("processing_class"))

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # The Trainer evaluates after on_step_end / on_epoch_end: attach that loss to the step's snapshot.
        if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
            return
        folder = self.snapshot_dir(args)
        if not os.path.isfile(os.path.join(folder, INDEX_FILE)):
            return
        entries = list_snapshots(folder)
        changed = False
        for entry in entries:
            if entry["step"] == state.global_step:
                entry["eval_loss"] = float(metrics["eval_loss"])
                changed = True
        if changed:
            _write_index(folder, entries)

    def _snapshot(
        self, args: TrainingArguments, state: TrainerState, model: nn.Module | None, processing_class: Any = None
    ) -> None:
        self._last_step = state.global_step
        if not state.is_world_process_zero:
            return
        if model is None:
            logger.warning("SnapshotCallback: the Trainer passed no model, skipping the snapshot")
            return
        folder = self.snapshot_dir(args)
        os.makedirs(folder, exist_ok=True)
        entries = list_snapshots(folder) if os.path.isfile(os.path.join(folder, INDEX_FILE)) else []
        name = snapshot_name(state.global_step)
        path = os.path.join(folder, name)
        if os.path.exists(path):
            logger.info("Snapshot %s already exists, not overwriting it", path)
        else:
            model = _unwrap(model)
            save_kwargs = {}
            if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
                save_kwargs["safe_serialization"] = True  # peft; transformers v5 always writes safetensors
            tmp_path = path + ".tmp"
            shutil.rmtree(tmp_path, ignore_errors=True)
            model.save_pretrained(tmp_path, **save_kwargs)
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(tmp_path)
            os.replace(tmp_path, path)  # a crash mid-save leaves no half-written snapshot behind
            logger.info("Saved snapshot %s (step %d)", path, state.global_step)
        if not any(entry["path"] == name for entry in entries):
            entries.append(
                {
                    "step": int(state.global_step),
                    "epoch": float(state.epoch) if state.epoch is not None else None,
                    "path": name,
                    "eval_loss": _latest_eval_loss(state.log_history, state.global_step),
                }
            )
            entries.sort(key=lambda e: e["step"])
        if self.keep_last is not None and len(entries) > self.keep_last:
            for old in entries[: len(entries) - self.keep_last]:
                shutil.rmtree(os.path.join(folder, old["path"]), ignore_errors=True)
                logger.info("Removed old snapshot %s", old["path"])
            entries = entries[len(entries) - self.keep_last :]
        _write_index(folder, entries)


__all__ = ["INDEX_FILE", "SnapshotCallback", "list_snapshots", "snapshot_name"]
