"""Training arguments of the distillation trainers (``HfArgumentParser``-parsable dataclasses)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .losses import RELATION_LOSSES, RESPONSE_LOSSES

FEATURE_LOSSES = ("mse", "cosine")
SNAPSHOT_STRATEGIES = ("no", "epoch", "steps")
MUTUAL_MODES = ("dml", "best")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _parse_layer_map(value: Any) -> list[int] | None:
    """``"uniform"``/None -> None (decided later from the models); ``"3,6,9"`` or a list -> ints."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "uniform", "auto")):
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(
            f"feature_layer_map must be 'uniform' or comma-separated teacher layer indices, got {value!r}"
        ) from None
    if any(v < 0 for v in out):
        raise ValueError(f"feature_layer_map holds hidden-state indices (0 = embeddings), got {out}")
    return out


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_nonneg(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the knobs of response-, feature- and relation-based distillation.

    The training loss is ``alpha * response + (1 - alpha) * lm + feature_weight * feature +
    attention_weight * attention + relation_weight * relation``. Evaluation reports the student's
    plain language-modelling loss, so ``exp(eval_loss)`` is its perplexity.
    """

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model path or Hub id, when no teacher_model object is passed."}
    )
    teacher_model_init_kwargs: str | dict | None = field(
        default=None,
        metadata={
            "help": "JSON dict of from_pretrained kwargs for the teacher "
            "(e.g. an efficiency_config to run a quantized teacher)."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": f"Teacher precision, one of {list(TEACHER_DTYPES)}; 'auto' keeps the teacher's own dtype."},
    )
    # response-based
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the response (logit) distillation loss; 1 - alpha weighs the label loss."},
    )
    distill_loss: str = field(default="forward_kl", metadata={"help": f"One of {list(RESPONSE_LOSSES)}."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; losses are scaled by T^2."})
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD mixing (0 = forward KL, 1 = reverse KL)."})
    # feature-based
    feature_weight: float = field(default=0.0, metadata={"help": "Weight of hidden-state matching."})
    feature_loss: str = field(default="mse", metadata={"help": f"One of {list(FEATURE_LOSSES)}."})
    feature_layer_map: str | None = field(
        default=None,
        metadata={
            "help": "Teacher hidden-state index for each student layer, comma-separated "
            "(0 = embeddings); default: the layers the student was copied from, "
            "else uniform."
        },
    )
    attention_weight: float = field(
        default=0.0, metadata={"help": "Weight of attention-map matching (eager attention on both models)."}
    )
    # relation-based
    relation_weight: float = field(default=0.0, metadata={"help": "Weight of the relation losses."})
    relation_losses: str = field(
        default="rkd_distance,rkd_angle", metadata={"help": f"Comma-separated subset of {list(RELATION_LOSSES)}."}
    )
    relation_layer: int = field(default=-1, metadata={"help": "Hidden-state index pooled for relations (-1 = last)."})
    # offline teacher
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of precomputed top-k teacher log-probabilities "
            "(hf_efficiency.distill.cache_teacher_logprobs); trains without a teacher."
        },
    )
    # self-distillation snapshots
    snapshot_strategy: str = field(
        default="no",
        metadata={"help": f"One of {list(SNAPSHOT_STRATEGIES)}: keep a snapshot of the student for StudentEnsemble."},
    )
    snapshot_steps: int = field(default=0, metadata={"help": "Snapshot every N steps (snapshot_strategy=steps)."})
    snapshot_keep_last: int | None = field(default=None, metadata={"help": "Keep only the last N snapshots."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit("alpha", self.alpha)
        _check_unit("beta", self.beta)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _check_choice("distill_loss", self.distill_loss, RESPONSE_LOSSES)
        _check_choice("feature_loss", self.feature_loss, FEATURE_LOSSES)
        _check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        _check_choice("snapshot_strategy", self.snapshot_strategy, SNAPSHOT_STRATEGIES)
        for name in ("feature_weight", "attention_weight", "relation_weight"):
            _check_nonneg(name, getattr(self, name))
        for name in self.relation_loss_names:
            _check_choice("relation_losses", name, RELATION_LOSSES)
        if self.snapshot_strategy == "steps" and self.snapshot_steps < 1:
            raise ValueError("snapshot_strategy='steps' needs snapshot_steps >= 1")
        _parse_layer_map(self.feature_layer_map)  # validates
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"teacher_model_init_kwargs is not valid JSON: {e}") from None
        if self.teacher_cache_dir and (self.feature_weight or self.attention_weight or self.relation_weight):
            raise ValueError(
                "A teacher cache holds only top-k log-probabilities: feature, attention and relation "
                "losses need the teacher model (set their weights to 0 or drop teacher_cache_dir)"
            )
        if self.teacher_cache_dir and self.distill_loss not in ("forward_kl", "soft_ce"):
            raise ValueError(
                f"distill_loss={self.distill_loss!r} needs the full teacher distribution; from a "
                "top-k teacher cache only 'forward_kl' and 'soft_ce' are possible"
            )

    @property
    def relation_loss_names(self) -> list[str]:
        return [n.strip() for n in (self.relation_losses or "").split(",") if n.strip()]

    @property
    def feature_layer_indices(self) -> list[int] | None:
        return _parse_layer_map(self.feature_layer_map)


@dataclass
class MutualDistillationTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for training several students together (online / mutual distillation).

    Each student's loss is its label loss plus ``mutual_weight`` x a KL term (Zhang et al., 2018).
    ``mutual_mode="dml"`` (deep mutual learning): the mean KL from its peers' (detached) distributions.
    ``"best"``: every ``exchange_steps`` (or each evaluation), the student with the lowest eval loss
    (training loss when there is no evaluation) teaches the others; the teacher itself trains on labels.
    ``mutual_warmup_steps`` ramps the weight up from 0, for students whose early predictions are poor.
    """

    mutual_mode: str = field(default="dml", metadata={"help": f"One of {list(MUTUAL_MODES)}."})
    mutual_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the peer KL added to each student's label loss (1 in deep mutual learning)."},
    )
    mutual_warmup_steps: int = field(
        default=0, metadata={"help": "Ramp mutual_weight linearly from 0 over these steps."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the peer KL (x T^2)."})
    exchange_steps: int = field(
        default=0,
        metadata={"help": "mode 'best': re-pick the teacher every N steps (0 = at each evaluation or epoch)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("mutual_mode", self.mutual_mode, MUTUAL_MODES)
        _check_nonneg("mutual_weight", self.mutual_weight)
        if self.mutual_warmup_steps < 0:
            raise ValueError(f"mutual_warmup_steps must be >= 0, got {self.mutual_warmup_steps}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.exchange_steps < 0:
            raise ValueError(f"exchange_steps must be >= 0, got {self.exchange_steps}")
