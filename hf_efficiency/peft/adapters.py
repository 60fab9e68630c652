"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

An adapter maps a sublayer's output ``h`` to ``h + up(act(down(h)))``: a down-projection to
``adapter_size`` features, a nonlinearity, and an up-projection back, with a residual connection.
The up-projection and both biases start at zero, so a new adapter is exactly the identity.

Placement: ``"pfeiffer"`` puts one adapter on the output of every decoder layer's MLP, ``"houlsby"``
one on the attention output and one on the MLP output (both before the layer's residual add).

Insertion never renames an existing parameter, so the base checkpoint still loads by name: the
adapter is registered as a child named ``adapter`` of the module it follows (``model.layers.0.mlp.adapter``)
and a forward hook on that module passes its output through the adapter. Adapter weights are kept
in float32 (as peft keeps LoRA weights), whatever the base's dtype or quantization: the input is
cast up and the update cast back to the hidden states' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftSpec
from .freeze import decoder_layers, float_dtype, module_device

ADAPTER_NAME = "adapter"
#: Child names tried, in order, for the MLP and the attention of a decoder layer.
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``down: hidden -> adapter_size`` and ``up: adapter_size -> hidden``."""

    def __init__(
        self,
        hidden_size: int,
        adapter_size: int,
        nonlinearity: str = "relu",
        init_scale: float = 0.01,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if nonlinearity not in _ACTIVATIONS:
            raise ValueError(f"nonlinearity={nonlinearity!r} is not allowed; allowed values: {', '.join(_ACTIVATIONS)}")
        self.hidden_size, self.adapter_size = hidden_size, adapter_size
        self.nonlinearity, self.init_scale = nonlinearity, init_scale
        self.down_weight = nn.Parameter(torch.empty(adapter_size, hidden_size, dtype=dtype, device=device))
        self.down_bias = nn.Parameter(torch.empty(adapter_size, dtype=dtype, device=device))
        self.up_weight = nn.Parameter(torch.empty(hidden_size, adapter_size, dtype=dtype, device=device))
        self.up_bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        if self.down_weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameter(self, name: str) -> None:
        """Initialize one parameter: the down-projection ~ N(0, init_scale^2), the rest zeros."""
        with torch.no_grad():
            p = getattr(self, name)
            if name == "down_weight":
                p.normal_(0.0, self.init_scale)
            else:
                p.zero_()

    def reset_parameters(self) -> None:
        for name, _ in self.named_parameters(recurse=False):
            self.reset_parameter(name)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down_weight.dtype)
        delta = F.linear(
            _ACTIVATIONS[self.nonlinearity](F.linear(x, self.down_weight, self.down_bias)), self.up_weight, self.up_bias
        )
        return h + delta.to(h.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, adapter_size={self.adapter_size}, nonlinearity={self.nonlinearity!r}"


def adapter_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: pass ``module``'s output (or the first element of a tuple output) through
    ``module.adapter``."""
    adapter = getattr(module, ADAPTER_NAME)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _child(layer_name: str, layer: nn.Module, names: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
    for n in names:
        child = getattr(layer, n, None)
        if isinstance(child, nn.Module):
            return n, child
    children = ", ".join(n for n, _ in layer.named_children())
    raise ValueError(
        f"adapters: decoder layer {layer_name} ({type(layer).__name__}) has no {what} child named "
        f"{' / '.join(names)} (its children: {children}); bottleneck adapters support decoder layers with one"
    )


def adapter_sites(model: nn.Module, spec: PeftSpec) -> list[str]:
    """Names of the modules an adapter follows, bottom layer first (attention before MLP)."""
    sites = []
    for layer_name, layer in decoder_layers(model):
        if spec.adapter_placement == "houlsby":
            sites.append(f"{layer_name}.{_child(layer_name, layer, ATTENTION_NAMES, 'attention')[0]}")
        sites.append(f"{layer_name}.{_child(layer_name, layer, MLP_NAMES, 'MLP')[0]}")
    return sites


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(f"adapters need config.hidden_size; {type(model).__name__}'s config has none")
    return size


def add_adapters(model: nn.Module, spec: PeftSpec) -> list[str]:
    """Register a `BottleneckAdapter` after every site and hook it in; returns the new parameter
    names. New adapters on a real device are initialized; on ``meta`` (inside ``from_pretrained``)
    they are filled by loading or by :func:`hf_efficiency.peft.methods.init_unloaded_peft_parameters`."""
    sites = adapter_sites(model, spec)
    taken = [s for s in sites if hasattr(model.get_submodule(s), ADAPTER_NAME)]
    if taken:
        raise ValueError(f"{taken[0]} already has a child named {ADAPTER_NAME!r}; adapters are already inserted")
    hidden = hidden_size_of(model)
    dtype = torch.promote_types(float_dtype(model), torch.float32)
    added = []
    for site in sites:
        module = model.get_submodule(site)
        adapter = BottleneckAdapter(
            hidden,
            spec.adapter_size,
            spec.adapter_nonlinearity,
            spec.adapter_init_scale,
            dtype=dtype,
            device=module_device(module),
        )
        module.add_module(ADAPTER_NAME, adapter)
        module.register_forward_hook(adapter_hook)
        added += [f"{site}.{ADAPTER_NAME}.{n}" for n, _ in adapter.named_parameters()]
    return added


def adapter_trainable_names(model: nn.Module) -> list[str]:
    """Names of every adapter parameter of the model."""
    return [
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, BottleneckAdapter)
        for p, _ in m.named_parameters(recurse=False)
    ]


__all__ = ["BottleneckAdapter", "adapter_hook", "adapter_sites", "adapter_trainable_names", "add_adapters"]
