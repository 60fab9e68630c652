"""Build a shallower student from a causal-LM teacher by copying a subset of its decoder layers.

:func:`make_student` keeps the teacher's class and width and only reduces ``num_hidden_layers``.
Embeddings, the final norm, the LM head (tied or not, as the config says) and the chosen decoder
layers are copied from the teacher; the student shares no storage with it. The chosen teacher
layer indices are recorded in ``student.config.distilled_from_layers`` (saved in ``config.json``)
so a feature-distillation trainer can pair student hidden state ``i + 1`` with teacher hidden
state ``distilled_from_layers[i] + 1``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.utils import logging

logger = logging.get_logger(__name__)

STRATEGIES = ("uniform", "every_other", "first", "last")

# Config attributes holding one entry per decoder layer: sliced to the chosen layers.
PER_LAYER_CONFIG_LISTS = (
    "layer_types",
    "mlp_layer_types",
    "no_rope_layers",
    "sliding_window_pattern",
    "num_attention_heads_per_layer",
)
# Config attributes holding a list of decoder-layer *indices*: renumbered to student indices.
LAYER_INDEX_CONFIG_LISTS = ("mlp_only_layers",)


def select_layers(
    num_teacher_layers: int,
    num_layers: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    strategy: str = "uniform",
) -> list[int]:
    """The teacher layer indices (0-based, increasing) a student built by :func:`make_student` keeps."""
    total = int(num_teacher_layers)
    if total < 1:
        raise ValueError(f"the teacher has no decoder layers (num_hidden_layers={total})")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise TypeError(f"num_layers must be an int, got {num_layers!r}")
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be in [1, {total}] (the teacher's layer count), got {num_layers}")

    if layers is not None:
        chosen = list(layers)
        if not chosen:
            raise ValueError("layers must name at least one teacher layer")
        for idx in chosen:
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise TypeError(f"layer indices must be ints, got {idx!r}")
            if not 0 <= idx < total:
                raise ValueError(f"layer index {idx} is out of range for a teacher with {total} layers")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"duplicate layer indices in {chosen}")
        if chosen != sorted(chosen):
            raise ValueError(f"layers must be in increasing order, got {chosen} (did you mean {sorted(chosen)}?)")
        if num_layers is not None and num_layers != len(chosen):
            raise ValueError(f"num_layers={num_layers} disagrees with the {len(chosen)} indices in layers")
        return chosen

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "every_other":
        evens = list(range(0, total, 2))
        if num_layers is None:
            return evens  # ceil(total / 2) layers
        if num_layers <= len(evens):
            return evens[:num_layers]
        # More layers than even indices: add the odd ones, deepest first.
        odds = [i for i in range(total - 1, -1, -1) if i % 2 == 1]
        return sorted(evens + odds[: num_layers - len(evens)])
    if num_layers is None:
        raise ValueError(f"strategy {strategy!r} needs num_layers")
    if strategy == "first":
        return list(range(num_layers))
    if strategy == "last":
        return list(range(total - num_layers, total))
    # uniform: round(linspace(0, total - 1, num_layers)); spacing >= 1 keeps the indices distinct
    if num_layers == 1:
        return [0]
    step = (total - 1) / (num_layers - 1)
    return [round(i * step) for i in range(num_layers)]


def _decoder_layers_name(model: nn.Module, num_layers: int) -> str:
    """Qualified name of the ``nn.ModuleList`` holding the ``num_layers`` decoder layers."""
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    if not candidates:
        raise ValueError(f"could not find a ModuleList of {num_layers} decoder layers in {type(model).__name__}")
    preferred = [name for name in candidates if name.rsplit(".", 1)[-1] in ("layers", "h", "layer", "blocks")]
    return min(preferred or candidates, key=lambda name: name.count("."))


def _student_config(teacher_config: Any, chosen: list[int]) -> Any:
    config_dict = teacher_config.to_dict()
    total = config_dict["num_hidden_layers"]
    config_dict["num_hidden_layers"] = len(chosen)
    for key in PER_LAYER_CONFIG_LISTS:
        value = config_dict.get(key)
        if isinstance(value, (list, tuple)) and len(value) == total:
            config_dict[key] = [value[i] for i in chosen]
    for key in LAYER_INDEX_CONFIG_LISTS:
        value = config_dict.get(key)
        if isinstance(value, (list, tuple)):
            config_dict[key] = [new for new, old in enumerate(chosen) if old in set(value)]
    per_layer = config_dict.get("per_layer_config")
    if per_layer:
        by_old = {int(k): v for k, v in per_layer.items()}
        config_dict["per_layer_config"] = {str(new): by_old[old] for new, old in enumerate(chosen) if old in by_old}
    config_dict["distilled_from_layers"] = list(chosen)
    config_dict.pop("transformers_version", None)
    config = type(teacher_config).from_dict(config_dict)
    config._attn_implementation = teacher_config._attn_implementation
    return config


def make_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    strategy: str = "uniform",
    dtype: torch.dtype | str | None = None,
) -> PreTrainedModel:
    """A causal LM of ``teacher``'s class with fewer decoder layers, initialized from the teacher.

    Layers are chosen explicitly (``layers``: increasing, distinct, 0-based teacher indices) or by
    ``strategy``: ``"uniform"`` (evenly spread, first and last teacher layer included),
    ``"every_other"`` (DistilBERT: 0, 2, 4, ...; ``ceil(L / 2)`` layers when ``num_layers`` is None),
    ``"first"`` or ``"last"``. Everything else (embeddings, final norm, LM head, rotary buffers) is
    copied as is. The teacher is not modified and the student is a deep copy (no shared storage), on
    the teacher's device, in ``dtype`` (default: the teacher's), in eval mode if the teacher is.
    ``student.config.distilled_from_layers`` lists the chosen teacher layers.
    """
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(
            f"teacher must be a transformers PreTrainedModel (merge peft adapters first), got {type(teacher).__name__}"
        )
    config = teacher.config
    if config.get_text_config(decoder=True) is not config:
        raise NotImplementedError("make_student supports plain causal LMs (no nested text config)")
    total = config.num_hidden_layers
    chosen = select_layers(total, num_layers, layers=layers, strategy=strategy)
    student_config = _student_config(config, chosen)

    prefix = _decoder_layers_name(teacher, total)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")

    def teacher_key(student_key: str) -> str:
        match = pattern.match(student_key)
        if match is None:
            return student_key
        return f"{prefix}.{chosen[int(match.group(1))]}.{match.group(2)}"

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    target_dtype = dtype if dtype is not None else teacher.dtype

    # Skip the random init (every tensor is overwritten below), then tie as the config says.
    with no_init_weights():
        student = type(teacher)._from_config(student_config, dtype=target_dtype)
    student.tie_weights()

    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
    teacher_buffers = dict(teacher.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, param in student.named_parameters():  # tied duplicates are visited once
            source = teacher_params.get(teacher_key(name))
            if source is None:
                raise ValueError(f"student parameter {name!r} has no counterpart {teacher_key(name)!r} in the teacher")
            if source.shape != param.shape:
                raise ValueError(
                    f"shape mismatch for {name!r}: student {tuple(param.shape)} vs teacher {tuple(source.shape)}"
                )
            param.copy_(source.detach().to(param.dtype))
        for name, buffer in student.named_buffers():
            source = teacher_buffers.get(teacher_key(name))
            if source is not None and source.shape == buffer.shape:
                buffer.copy_(source.detach().to(buffer.dtype))
            elif source is None:
                logger.debug("buffer %s kept from the student's own initialization", name)

    student.to(device=teacher.device)
    student.train(teacher.training)
    if hasattr(teacher, "generation_config") and teacher.generation_config is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    logger.info("Built a %d-layer student from %d teacher layers: %s", len(chosen), total, chosen)
    return student


__all__ = ["STRATEGIES", "make_student", "select_layers"]
