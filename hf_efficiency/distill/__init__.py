"""Knowledge distillation: losses, trainers, student construction, teacher caches and ensembles.

- ``DistillationTrainer`` / ``DistillationTrainingArguments``: response-, feature- and relation-based
  distillation from a frozen teacher (or an offline top-k teacher cache), a drop-in ``Trainer``.
- ``MutualDistillationTrainer``: several students teaching each other (online distillation).
- ``StudentEnsemble`` + ``SnapshotCallback``: self-distillation snapshots averaged into one causal LM.
- ``make_student``: a smaller student initialized from the teacher's layers.

Names are imported on first use, so ``import hf_efficiency`` does not pull in ``transformers.Trainer``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DistillationTrainingArguments": ".arguments",
    "MutualDistillationTrainingArguments": ".arguments",
    "EnsembleCache": ".ensemble",
    "StudentEnsemble": ".ensemble",
    "StudentEnsembleConfig": ".ensemble",
    "MutualDistillationTrainer": ".mutual",
    "StudentGroup": ".mutual",
    "FeatureProjector": ".projections",
    "SnapshotCallback": ".snapshots",
    "list_snapshots": ".snapshots",
    "make_student": ".student",
    "TeacherCache": ".teacher_cache",
    "TeacherCacheCollator": ".teacher_cache",
    "TeacherCacheDataset": ".teacher_cache",
    "cache_teacher_logprobs": ".teacher_cache",
    "DistillationTrainer": ".trainer",
    "check_same_vocabulary": ".trainer",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (built from the export table)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
