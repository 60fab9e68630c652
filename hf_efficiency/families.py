"""How model families are laid out: where the decoder layers are (read by every capability that walks
layers, instead of each knowing a family's module names). Family descriptions grow here."""

from __future__ import annotations

from torch import nn


def decoder_layer_prefixes(model: nn.Module, num_layers: int) -> list[str]:
    """Module names of the decoder layers (the ``ModuleList`` with ``num_layers`` entries)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return [f"{name}.{i}" for i in range(num_layers)]
    raise ValueError(f"could not find the {num_layers} decoder layers in {type(model).__name__}")


__all__ = ["decoder_layer_prefixes"]
