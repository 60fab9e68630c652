"""``DistillationTrainer``: a drop-in ``transformers.Trainer`` that distills a frozen teacher into the model.

Response-based (logit) losses, feature-based hidden-state / attention matching with learned projections,
relation-based losses, and training from an offline top-k teacher cache, combined as described in
``DistillationTrainingArguments``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback
from transformers.utils import logging

from ..vocab import check_same_vocabulary as same_vocabulary
from ..vocab import tokenizer_of as _tokenizer_of
from .arguments import DistillationTrainingArguments
from .distributed import (
    average_gradients,
    broadcast_parameters,
    check_parallel_setup,
    clip_with_extra_parameters,
    deepspeed_inference_engine,
    is_zero3_partitioned,
    sum_across_processes,
    world_size,
)
from .losses import (
    attention_map_loss,
    hidden_state_loss,
    pool_hidden,
    response_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    token_mask,
    token_similarity_loss,
    topk_response_loss,
)
from .projections import PROJECTIONS_WEIGHTS, FeatureProjector, default_layer_map
from .snapshots import SnapshotCallback
from .teacher_cache import TEACHER_KEYS, TeacherCache, TeacherCacheCollator, TeacherCacheDataset

logger = logging.get_logger(__name__)

_TEACHER_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def check_same_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise ``ValueError`` when two tokenizers map tokens to different ids (logit distillation compares
    distributions position by position over one shared vocabulary)."""
    same_vocabulary(
        student_tokenizer,
        teacher_tokenizer,
        names=("student", "teacher"),
        hint="Logit distillation needs one vocabulary: use a teacher and student from the same "
        "family, or pass teacher_processing_class=None if the ids are known to agree.",
    )


def load_teacher(teacher: Any, args: DistillationTrainingArguments) -> tuple[nn.Module | None, Any]:
    """The frozen teacher (and its tokenizer when loaded from a path) from a model object or a path."""
    teacher = args.teacher_model_name_or_path if teacher is None else teacher
    if teacher is None:
        return None, None
    tokenizer = None
    dtype = None if args.teacher_dtype == "auto" else getattr(torch, args.teacher_dtype)
    if isinstance(teacher, (str, os.PathLike)):
        path = os.fspath(teacher)
        kwargs = dict(args.teacher_model_init_kwargs or {})
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        teacher = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None
    elif dtype is not None and not getattr(teacher, "is_quantized", False):
        teacher = teacher.to(dtype)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be a model or a path, got {type(teacher).__name__}")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, tokenizer


class _ComponentLog:
    """Running sums of the loss components between two training logs."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def add(self, parts: dict[str, torch.Tensor], scales: dict[str, float] | None = None) -> None:
        """Add one micro-batch's components, each times its ``scales`` entry (default 1)."""
        scales = scales or {}
        for k, v in parts.items():
            self.sums[k] += float(v.detach()) * scales.get(k, 1.0)
        self.count += 1

    def pop(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """The mean of every component since the last call, over the micro-batches and (in a distributed
        run: a collective, called by every process) over the processes."""
        if not self.count:
            return {}
        keys = sorted(self.sums)
        means = [self.sums[k] / self.count for k in keys]
        if world_size() > 1:  # the same keys in every process, sorted: one all-reduce
            total = sum_across_processes(torch.tensor(means, dtype=torch.float64, device=device))
            means = (total / world_size()).tolist()
        self.sums.clear()
        self.count = 0
        return {k: round(v, 4) for k, v in zip(keys, means)}


def missed_epoch_evaluation(args: Any, state: Any, train_dataloader: Any) -> bool:
    """True when a run resumed at ``state`` starts from a ``save_strategy="steps"`` checkpoint written at the
    step that completed an epoch whose ``eval_strategy="epoch"`` evaluation came after it.

    ``Trainer`` writes such a checkpoint before ``on_epoch_end`` and the epoch's evaluation, and a run
    resumed from it starts in the next epoch, so it never evaluates that epoch: the log, the best-metric
    bookkeeping and the global RNG (every evaluation ``DataLoader`` iterator draws a seed from it, which
    changes the next dropout masks) then differ from the uninterrupted run's.
    """
    if not 0 < state.global_step < state.max_steps or state.epoch is None:
        return False
    if args.eval_strategy != "epoch" or args.save_strategy != "steps" or args.eval_delay > state.epoch:
        return False
    try:
        n = len(train_dataloader)
    except TypeError:  # None, or an iterable dataset: no epochs to speak of
        return False
    ga = args.gradient_accumulation_steps
    per_epoch = n // ga + int(n % ga > 0)
    return per_epoch > 0 and state.global_step % per_epoch == 0


class _FlagMissedEpochEvaluation(TrainerCallback):
    def __init__(self, trainer: ReplaysMissedEpochEvaluation):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer._missed_epoch_evaluation = missed_epoch_evaluation(args, state, train_dataloader)


class ReplaysMissedEpochEvaluation:
    """``Trainer`` mixin: a run resumed from a checkpoint that preceded its epoch's evaluation (see
    :func:`missed_epoch_evaluation`) runs that evaluation where the interrupted run ran it, after the
    checkpoint's RNG states are restored and before the next epoch's data is drawn. Call
    ``self._track_missed_epoch_evaluation()`` in ``__init__``."""

    _missed_epoch_evaluation = False

    def _track_missed_epoch_evaluation(self) -> None:
        self.add_callback(_FlagMissedEpochEvaluation(self))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self._missed_epoch_evaluation:
            self._missed_epoch_evaluation = False
            logger.info("Resumed at the end of an epoch: running the evaluation that followed the checkpoint")
            metrics = self._evaluate(None, None)
            self._determine_best_metric(metrics=metrics, trial=None)


class _ClearProjectorGrads(TrainerCallback):
    """Clears the projections' gradients after every optimizer step. ``Trainer`` zeroes only the model's
    gradients (``model.zero_grad()``); without this the projections, which live outside the model, would
    step on the sum of every gradient since the start of training (and a resumed run, which starts from
    no gradient, would diverge from an uninterrupted one)."""

    def __init__(self, projector: nn.Module):
        self.projector = projector

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projector.zero_grad(set_to_none=True)


class DistillationTrainer(ReplaysMissedEpochEvaluation, Trainer):
    """``transformers.Trainer`` that trains ``model`` (the student) to imitate a frozen ``teacher_model``.

    Same constructor as ``Trainer``, plus ``teacher_model`` (a model, a path or Hub id, or None to read
    ``args.teacher_model_name_or_path``; None with ``args.teacher_cache_dir`` trains from a cache) and
    ``teacher_processing_class`` (checked against ``processing_class``: the vocabularies must agree).

    The teacher is frozen, in eval mode, without gradients, on the student's device. The loss is
    normalized by the number of label tokens in the whole accumulated batch (``num_items_in_batch``) and
    ``loss_is_scaled_for_ga = True``, so gradient accumulation over k micro-batches gives the update of one
    k-times larger batch. Evaluation reports the student's plain label loss (``exp(eval_loss)`` is its
    perplexity). Learned feature projections are optimized with the student and saved apart from it
    (``distill_projections.safetensors``) in every checkpoint; resuming restores them. A run resumed with
    ``train(resume_from_checkpoint=...)`` continues exactly where the checkpoint was written (bit-identical
    weights on CPU), including a checkpoint that preceded its epoch's evaluation.
    """

    loss_is_scaled_for_ga = True
    _tag_names: ClassVar[list[str]] = ["hf-efficiency", "distillation"]

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: DistillationTrainingArguments | None = None,
        *args_rest: Any,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        teacher_processing_class: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = DistillationTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(f"DistillationTrainer needs DistillationTrainingArguments, got {type(args).__name__}")
        super().__init__(model, args, *args_rest, **kwargs)
        self.teacher_cache: TeacherCache | None = None
        self.teacher = None
        if self.args.teacher_cache_dir:
            # the cache replaces the teacher (teacher_model_name_or_path may still name where it came from)
            if teacher_model is not None:
                raise ValueError("Pass either a teacher model or teacher_cache_dir, not both")
            self._use_teacher_cache()
        else:
            self.teacher, loaded_tokenizer = load_teacher(teacher_model, self.args)
            if self.teacher is None:
                raise ValueError(
                    "DistillationTrainer needs a teacher: pass teacher_model=, set "
                    "args.teacher_model_name_or_path, or args.teacher_cache_dir"
                )
            if not hasattr(self.teacher, "hf_device_map") and not is_zero3_partitioned(self.teacher):
                self.teacher.to(self.args.device)
            teacher_tok = teacher_processing_class if teacher_processing_class is not None else loaded_tokenizer
            if self.processing_class is not None and teacher_tok is not None:
                check_same_vocabulary(self.processing_class, teacher_tok)
            self._check_vocab_sizes()
        self.projector = self._build_projector()
        self.layer_map = self.projector.layer_map if self.projector is not None else self._layer_map()
        check_parallel_setup(self, has_external_parameters=bool(self._projector_params()))
        if self.teacher is not None and self.is_deepspeed_enabled and is_zero3_partitioned(self.teacher):
            # loaded under ZeRO-3's zero.Init: only an engine gathers its weights for the forward
            self.teacher = deepspeed_inference_engine(self.teacher, self.accelerator)
        if self.projector is not None:
            self.add_callback(_ClearProjectorGrads(self.projector))
        self._track_missed_epoch_evaluation()
        if self.args.snapshot_strategy != "no":
            every = self.args.snapshot_steps if self.args.snapshot_strategy == "steps" else None
            self.add_callback(SnapshotCallback(every_n_steps=every, keep_last=self.args.snapshot_keep_last))
        self._components = _ComponentLog()

    # ------------------------------------------------------------------ setup

    @property
    def _student(self) -> nn.Module:
        m = self.accelerator.unwrap_model(self.model)
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _check_vocab_sizes(self) -> None:
        tok = _tokenizer_of(self.processing_class)
        tv = getattr(self.teacher.config, "vocab_size", None)
        if tok is not None and tv is not None and len(tok) > tv:
            raise ValueError(
                f"The tokenizer has {len(tok)} tokens but the teacher's vocabulary has only {tv}: "
                "the teacher cannot score every student token"
            )

    def _use_teacher_cache(self) -> None:
        if self.train_dataset is None:
            raise ValueError("Training from a teacher cache needs train_dataset (the rows the cache was built on)")
        self.teacher_cache = TeacherCache(self.args.teacher_cache_dir)
        self.train_dataset = TeacherCacheDataset(self.train_dataset, self.teacher_cache)
        side = getattr(_tokenizer_of(self.processing_class), "padding_side", "right") or "right"
        self.data_collator = TeacherCacheCollator(self.data_collator, padding_side=side)

    def _layer_map(self) -> list[int] | None:
        if self.teacher is None:
            return None
        lt = int(self.teacher.config.num_hidden_layers)
        explicit = self.args.feature_layer_indices
        scfg = self._student.config
        if explicit is None:
            return default_layer_map(scfg, lt)
        if len(explicit) != scfg.num_hidden_layers:
            raise ValueError(
                f"feature_layer_map has {len(explicit)} entries; the student has "
                f"{scfg.num_hidden_layers} layers (one teacher hidden-state index per student layer)"
            )
        if max(explicit) > lt:
            raise ValueError(f"feature_layer_map index {max(explicit)} exceeds the teacher's {lt} layers")
        return explicit

    def _build_projector(self) -> FeatureProjector | None:
        if self.teacher is None or self.args.feature_weight == 0:
            return None
        layer_map = self._layer_map()
        sw = int(self._student.config.hidden_size)
        tw = int(self.teacher.config.hidden_size)
        proj = FeatureProjector(sw, tw, layer_map, trainable=sw != tw).to(self.args.device)
        broadcast_parameters(proj)  # every process starts from process 0's maps, like DDP's model
        logger.info(
            "Feature distillation: student layers 1..%d -> teacher hidden states %s (%s)",
            len(layer_map),
            layer_map,
            "learned projection" if sw != tw else "same width",
        )
        return proj

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for k in TEACHER_KEYS:
            if k not in self._signature_columns:
                self._signature_columns.append(k)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        params = [p for p in self.projector.parameters() if p.requires_grad] if self.projector is not None else []
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if params and id(params[0]) not in known:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        inputs = dict(inputs)
        cached_lp = inputs.pop("teacher_topk_logprobs", None)
        cached_ix = inputs.pop("teacher_topk_indices", None)
        if not model.training:
            # Evaluation: the student's own label loss, so exp(eval_loss) is its perplexity.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        a = self.args
        labels = inputs.get("labels")
        need_hidden = bool(a.feature_weight or a.relation_weight)
        need_attn = bool(a.attention_weight)
        extra: dict[str, Any] = {}
        if need_hidden:
            extra["output_hidden_states"] = True
        if need_attn:
            extra["output_attentions"] = True
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            extra["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs, **extra)

        if labels is not None:
            mask = token_mask(labels)
        elif inputs.get("attention_mask") is not None:
            am = inputs["attention_mask"].bool()
            mask = torch.zeros_like(am)
            mask[:, :-1] = am[:, 1:] & am[:, :-1]
        else:
            ids = inputs["input_ids"]
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[:, -1] = False

        parts: dict[str, torch.Tensor] = {}
        t_out = None
        if cached_lp is not None:
            parts["response"] = topk_response_loss(
                outputs.logits,
                cached_lp.to(outputs.logits.device),
                cached_ix.to(outputs.logits.device),
                mask,
                loss=a.distill_loss,
                temperature=a.temperature,
                num_items_in_batch=num_items_in_batch,
            )
        elif a.alpha > 0 or need_hidden or need_attn:
            t_inputs = {k: v for k, v in inputs.items() if k in _TEACHER_INPUTS}
            with torch.no_grad():
                t_out = self.teacher(**t_inputs, **{k: v for k, v in extra.items() if k != "num_items_in_batch"})
            if a.alpha > 0:
                parts["response"] = response_loss(
                    outputs.logits,
                    t_out.logits,
                    mask,
                    loss=a.distill_loss,
                    temperature=a.temperature,
                    beta=a.beta,
                    num_items_in_batch=num_items_in_batch,
                )
        lm = outputs.loss if labels is not None else None
        if lm is not None:
            parts["lm"] = lm
        tok_mask = inputs["attention_mask"].bool() if inputs.get("attention_mask") is not None else None
        if a.feature_weight and t_out is not None:
            pairs = self.projector(outputs.hidden_states)
            parts["feature"] = torch.stack(
                [
                    hidden_state_loss(s, t_out.hidden_states[t].to(s.dtype), tok_mask, kind=a.feature_loss)
                    for s, t in pairs
                ]
            ).mean()
        if a.attention_weight and t_out is not None:
            parts["attention"] = self._attention_loss(outputs, t_out, tok_mask)
        if a.relation_weight and t_out is not None:
            parts["relation"] = self._relation_loss(outputs, t_out, tok_mask)

        # Token terms are normalized by the accumulated batch's label count; per-batch means are divided
        # by the number of micro-batches: together, GA over k micro-batches == one k-times larger batch.
        ga = (
            self.current_gradient_accumulation_steps
            if getattr(self, "current_gradient_accumulation_steps", None)
            else 1
        )
        if num_items_in_batch is None:
            token_scale = 1.0 / ga
        elif a.average_tokens_across_devices and self.accelerator.num_processes > 1:
            token_scale = float(self.accelerator.num_processes)
        else:
            token_scale = 1.0
        alpha = 0.0 if "response" not in parts else (1.0 if lm is None else a.alpha)
        loss = outputs.logits.new_zeros((), dtype=torch.float32)
        if "response" in parts:
            loss = loss + alpha * token_scale * parts["response"]
        if lm is not None and alpha < 1:
            loss = loss + (1 - alpha) * token_scale * lm.float()
        for name, weight in (
            ("feature", a.feature_weight),
            ("attention", a.attention_weight),
            ("relation", a.relation_weight),
        ):
            if name in parts:
                loss = loss + weight * parts[name] / ga
        # log each token term as the step's value: it is normalized by the label count of every micro-batch
        # (and process), so scale it back to this micro-batch's share before the log averages the shares
        per_step = 1.0 if num_items_in_batch is None else ga * token_scale
        self._components.add(parts, {"response": per_step, "lm": per_step})
        return (loss, outputs) if return_outputs else loss

    def _attention_loss(self, outputs: Any, t_out: Any, tok_mask: torch.Tensor | None) -> torch.Tensor:
        s_att, t_att = outputs.attentions, t_out.attentions
        if not s_att or not t_att or s_att[0] is None or t_att[0] is None:
            raise ValueError(
                "Attention-map distillation needs attention probabilities from both models: load "
                "student and teacher with attn_implementation='eager'"
            )
        losses = [
            attention_map_loss(s_att[i], t_att[t - 1].to(s_att[i].dtype), tok_mask)
            for i, t in enumerate(self.layer_map)
            if t >= 1
        ]
        return torch.stack(losses).mean()

    def _relation_loss(self, outputs: Any, t_out: Any, tok_mask: torch.Tensor | None) -> torch.Tensor:
        idx = self.args.relation_layer
        s_h = outputs.hidden_states[idx]
        t_h = t_out.hidden_states[-1] if idx == -1 else t_out.hidden_states[self.layer_map[idx - 1]]
        t_h = t_h.to(s_h.dtype)
        terms = []
        names = self.args.relation_loss_names
        if "rkd_distance" in names or "rkd_angle" in names:
            sp, tp = pool_hidden(s_h, tok_mask), pool_hidden(t_h, tok_mask)
            if "rkd_distance" in names:
                terms.append(rkd_distance_loss(sp, tp))
            if "rkd_angle" in names:
                terms.append(rkd_angle_loss(sp, tp))
        if "token_similarity" in names:
            terms.append(token_similarity_loss(s_h, t_h, tok_mask))
        return torch.stack(terms).sum()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every process logs the training loss (Trainer gathers it): average the parts too
            parts = self._components.pop(device=self.args.device)
            logs = {**logs, **{f"loss_{k}": v for k, v in parts.items()}}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ several processes

    def _projector_params(self) -> list[nn.Parameter]:
        return [p for p in self.projector.parameters() if p.requires_grad] if self.projector is not None else []

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            # DDP / FSDP average the model's gradients over the processes at the last micro-batch of a step;
            # the projections live outside the model: average theirs here, before clipping and the step
            average_gradients(self._projector_params())
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip the model's and the learned projections' gradients together (one global norm, as if the
        projections were part of the model); returns the pre-clip norm."""
        params = self._projector_params()
        if not params or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        model_norm = self._get_grad_norm(model)  # over every shard under FSDP; unscales fp16 gradients
        return clip_with_extra_parameters(model.parameters(), params, model_norm, self.args.max_grad_norm)

    # ------------------------------------------------------------------ save / resume

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.projector is not None and self.args.should_save:
            self.projector.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.projector is None:
            return
        if self.projector.load_from(resume_from_checkpoint):
            logger.info("Restored feature projections from %s", resume_from_checkpoint)
        elif any(p.requires_grad for p in self.projector.parameters()):
            # fresh projections against a trained student (and an optimizer state that expects trained ones)
            raise ValueError(
                f"{resume_from_checkpoint} holds no learned feature projections ({PROJECTIONS_WEIGHTS}), but "
                "this run trains them (feature_weight > 0, student and teacher widths differ): resume "
                "from a checkpoint of the same feature-distillation run"
            )
