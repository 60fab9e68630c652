"""peft's ``prepare_model_for_kbit_training`` for models quantized by hf-efficiency as well.

peft enables gradient checkpointing and input gradients only for the quantizers it knows, and casts
every float16/bfloat16 parameter of the others to float32. This version runs peft's and then, for a
model holding `QuantLinear` layers, keeps their scales and minima in their storage dtype (like
bitsandbytes' ``Params4bit``) and enables checkpointing as peft does for bitsandbytes. After
``import hf_efficiency``, ``peft.prepare_model_for_kbit_training`` is this function (`registry.py`);
import it from here when peft's name was bound before that.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..quant.modules.linear import QuantLinear


def _peft_original():
    from peft.utils import other

    current = other.prepare_model_for_kbit_training
    return getattr(current, "_hf_efficiency_original", current)


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
        if gc_kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model
