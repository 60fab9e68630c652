"""Freezing the lower layers: the input embedding (and the output head when it is tied to it) and
the lower ``freeze_layers`` decoder layers stay fixed; every other floating-point parameter trains.

Also home of the helpers the other methods share: the decoder layers, the float dtype of a model,
and which modules are linears / quantized linears.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PeftSpec
from ..families import decoder_layer_prefixes
from ..quant.modules.linear import QuantLinear


def num_decoder_layers(model: nn.Module) -> int:
    """``num_hidden_layers`` of the model's (text) config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(
            f"{type(model).__name__} has no config.num_hidden_layers; peft methods need a transformers decoder model"
        )
    return n


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every decoder layer, bottom first (the ``ModuleList`` holding
    ``num_hidden_layers`` entries, as the memory estimator finds it)."""
    return [(p, model.get_submodule(p)) for p in decoder_layer_prefixes(model, num_decoder_layers(model))]


def in_prefix(name: str, prefix: str) -> bool:
    """True when parameter/module ``name`` is ``prefix`` or lies inside it."""
    return name == prefix or name.startswith(prefix + ".")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear))


def float_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating-point compute dtype: its input embedding's, else its first float
    parameter outside quantized linears (whose scales may be float16 in a float32 model)."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.is_floating_point():
        return emb.weight.dtype
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU when it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def check_freeze_layers(model: nn.Module, spec: PeftSpec) -> int:
    """The layer count, after checking that ``spec.freeze_layers`` does not exceed it."""
    n = num_decoder_layers(model)
    if spec.freeze_layers > n:
        raise ValueError(
            f"peft.freeze_layers={spec.freeze_layers} is larger than the {n} decoder layers of this "
            f"{type(model).__name__}; allowed values: 0..{n}"
        )
    return n


def freeze_trainable_names(model: nn.Module, spec: PeftSpec) -> list[str]:
    """Names of the parameters ``"freeze"`` trains: every float parameter except the input
    embedding (and anything tied to it) and those of the lower ``freeze_layers`` decoder layers."""
    check_freeze_layers(model, spec)
    frozen_prefixes = [p for p, _ in decoder_layers(model)[: spec.freeze_layers]]
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    frozen_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen_ids or any(in_prefix(name, f) for f in frozen_prefixes) or not p.is_floating_point():
            continue
        names.append(name)
    quantized = [
        n
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and not any(in_prefix(n, f) for f in frozen_prefixes)
    ]
    if quantized:
        shown = ", ".join(quantized[:3]) + (", ..." if len(quantized) > 3 else "")
        raise ValueError(
            f"peft method 'freeze' would train {len(quantized)} quantized linear(s) above layer "
            f"{spec.freeze_layers} ({shown}) whose integer weights cannot train; keep the trained layers in float "
            "with quantization.modules_to_not_convert, or use method 'bitfit' or 'adapters' on a quantized base"
        )
    return names


__all__ = ["check_freeze_layers", "decoder_layers", "float_dtype", "freeze_trainable_names", "num_decoder_layers"]
