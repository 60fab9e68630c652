"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

Targets are modules: by default every linear and every module owning a ``bias`` inside the decoder
layers (the output head and the embeddings are left out). A target linear without a bias (Llama
has none) gets a zero-initialized one when ``bitfit_add_missing`` is set, so the model's output is
unchanged until training moves it. On a quantized base the bias of our `QuantLinear` is a float
parameter beside the packed weight, so BitFit trains it while the weight stays packed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PeftSpec
from ..quant.core.mixed import module_matches
from .freeze import decoder_layers, float_dtype, in_prefix, is_linear, module_device


def _own_bias(module: nn.Module) -> nn.Parameter | None:
    return dict(module.named_parameters(recurse=False)).get("bias")


def bitfit_modules(model: nn.Module, spec: PeftSpec) -> list[str]:
    """Names of the modules whose bias BitFit trains (including linears that will get one)."""

    def usable(module: nn.Module) -> bool:
        return _own_bias(module) is not None or (spec.bitfit_add_missing and is_linear(module))

    if spec.bitfit_targets is None:
        prefixes = [p for p, _ in decoder_layers(model)]
        names = [n for n, m in model.named_modules() if any(in_prefix(n, p) for p in prefixes) and usable(m)]
        if not names:
            raise ValueError(
                f"BitFit found no bias in the decoder layers of this {type(model).__name__} and "
                "peft.bitfit_add_missing=False; set bitfit_add_missing=True to add zero-initialized biases to the "
                "linears, or choose another method"
            )
        return names
    matched = [(n, m) for n, m in model.named_modules() if n and any(module_matches(n, p) for p in spec.bitfit_targets)]
    names = [n for n, m in matched if usable(m)]
    if not names:
        what = "no module" if not matched else f"{len(matched)} module(s), none with a bias"
        hint = "" if spec.bitfit_add_missing else " (bitfit_add_missing=False: linears without a bias are skipped)"
        raise ValueError(f"peft.bitfit_targets={spec.bitfit_targets!r} matched {what}{hint}; nothing would train")
    return names


def add_bitfit_biases(model: nn.Module, spec: PeftSpec) -> list[str]:
    """Give every target linear without a bias a zero bias (on the module's device, meta included).
    Returns the names of the added parameters."""
    added = []
    dtype = float_dtype(model)
    for name in bitfit_modules(model, spec):
        module = model.get_submodule(name)
        if _own_bias(module) is not None:
            continue
        if isinstance(module, nn.Linear):
            bias_dtype = module.weight.dtype
        else:
            bias_dtype = dtype  # QuantLinear: the weight is packed integers; compute in the model's dtype
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=bias_dtype, device=module_device(module)))
        added.append(f"{name}.bias")
    return added


def bitfit_trainable_names(model: nn.Module, spec: PeftSpec) -> list[str]:
    """Names of the bias parameters BitFit trains (after `add_bitfit_biases`)."""
    out = []
    for name in bitfit_modules(model, spec):
        if _own_bias(model.get_submodule(name)) is None:
            raise ValueError(f"{name} has no bias yet: run apply_peft (which adds it) before selecting parameters")
        out.append(f"{name}.bias")
    return out


__all__ = ["add_bitfit_biases", "bitfit_modules", "bitfit_trainable_names"]
