"""peft's ``prepare_model_for_kbit_training`` for models quantized by hf-efficiency as well.

peft enables gradient checkpointing and input gradients only for the quantizers it knows, and casts
every float16/bfloat16 parameter of the others to float32. This version runs peft's and then, for a
model holding `QuantLinear` layers, keeps their scales and minima in their storage dtype (like
bitsandbytes' ``Params4bit``) and enables checkpointing as peft does for bitsandbytes. After
``import hf_efficiency``, ``peft.prepare_model_for_kbit_training`` is this function (`registry.py`);
import it from here when peft's name was bound before that.

In a distributed run (``WORLD_SIZE`` > 1) the checkpointing it enables is non-reentrant unless
``gradient_checkpointing_kwargs`` says otherwise: ``Trainer`` wraps a peft model in DDP with
``find_unused_parameters=True``, which fails on reentrant checkpointing ("Expected to mark a variable
ready only once").
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..quant.modules.linear import QuantLinear

logger = logging.get_logger(__name__)


def _peft_original():
    from peft.utils import other

    current = other.prepare_model_for_kbit_training
    return getattr(current, "_hf_efficiency_original", current)


def _distributed() -> bool:
    """True inside a multi-process run (launched by torchrun / accelerate, or a process group of 2+)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    *args: Any,
    **kwargs: Any,
) -> nn.Module:
    """peft's preparation (freeze the base, upcast float16/bfloat16 parameters), plus gradient
    checkpointing and input gradients for hf-efficiency's quantized layers."""
    stored = [(m, m.storage_dtypes()) for m in model.modules() if isinstance(m, QuantLinear)]
    model = _peft_original()(model, use_gradient_checkpointing, gradient_checkpointing_kwargs, *args, **kwargs)
    for m, dtypes in stored:
        m.set_storage_dtypes(dtypes)  # peft upcast them in place (``.data``); the module puts them back
    if use_gradient_checkpointing and stored:
        gc_kwargs = dict(gradient_checkpointing_kwargs or {})
        if "use_reentrant" not in gc_kwargs and _distributed():
            logger.info("Distributed run: non-reentrant gradient checkpointing (DDP with find_unused_parameters)")
            gc_kwargs["use_reentrant"] = False
        if gc_kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model
