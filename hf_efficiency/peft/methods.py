"""Apply a `PeftSpec` (BitFit, freezing the lower layers, bottleneck adapters) to a model.

:func:`apply_peft` is the one entry point::

    model = apply_peft(model, {"method": "adapters", "adapter_size": 64})
    trainable_parameters(model)        # (trainable, total)

It builds the method's structure (adapters, added biases), freezes everything else, and records the
spec in ``model.config.quantization_config`` (an `EfficiencyConfig`), so ``save_pretrained`` +
``from_pretrained`` rebuild the structure and reload the trained tensors by name. Loading with
``from_pretrained(..., efficiency_config={"peft": {...}})`` does the same through the quantizer:
:func:`build_peft_structure` runs on the empty model before the weights load, and
:func:`init_unloaded_peft_parameters` + :func:`mark_trainable` after. :func:`save_peft_weights` /
:func:`load_peft_weights` write and read only the trained tensors.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import FORMAT_VERSION, QUANT_METHOD, EfficiencyConfig, PeftSpec
from ..quant.core.mixed import module_matches
from ..quant.modules.linear import QuantLinear
from .adapters import BottleneckAdapter, adapter_trainable_names, add_adapters
from .bitfit import add_bitfit_biases, bitfit_trainable_names
from .freeze import freeze_trainable_names

logger = logging.get_logger(__name__)

PEFT_WEIGHTS_NAME = "hf_efficiency_peft.safetensors"
PEFT_CONFIG_NAME = "hf_efficiency_peft.json"
#: Attributes set on a model that carries a method: its `PeftSpec` and the names of the added parameters.
SPEC_ATTR = "hf_efficiency_peft"
ADDED_ATTR = "hf_efficiency_peft_added"


def _coerce(spec: PeftSpec | dict[str, Any]) -> PeftSpec:
    return PeftSpec.from_dict(spec)


def peft_spec(model: nn.Module) -> PeftSpec | None:
    """The `PeftSpec` applied to ``model``, or ``None``."""
    return getattr(model, SPEC_ATTR, None)


def build_peft_structure(model: nn.Module, spec: PeftSpec | dict[str, Any], expect_missing: bool = False) -> list[str]:
    """Add the method's new parameters (adapters; zero biases for BitFit) to ``model`` without
    touching ``requires_grad``, and check that the method can train this model; returns the new
    names. Runs on the meta model inside ``from_pretrained``, where ``expect_missing`` (loading a base
    checkpoint without them) keeps the new names out of transformers' missing-keys report. A second
    call with the same spec does nothing; a different spec raises."""
    spec = _coerce(spec)
    current = peft_spec(model)
    if current is not None:
        if current.to_dict() != spec.to_dict():
            raise ValueError(
                f"this model already carries peft method {current.method!r} ({current.to_dict()}); load the base "
                f"model again to apply {spec.to_dict()}"
            )
        return list(getattr(model, ADDED_ATTR, []))
    # every check runs before the model is changed (the add_* functions check before adding)
    _check_base(model)
    _trainable_module_names(model, spec)
    if spec.method == "bitfit":
        added = add_bitfit_biases(model, spec)
    elif spec.method == "adapters":
        added = add_adapters(model, spec)
    else:
        freeze_trainable_names(model, spec)
        added = []
    setattr(model, SPEC_ATTR, spec)
    setattr(model, ADDED_ATTR, added)
    if expect_missing and added:
        ignored = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        model._keys_to_ignore_on_load_missing = ignored | {rf"^{re.escape(n)}$" for n in added}
    return added


def _check_base(model: nn.Module) -> None:
    """Refuse bases whose forward pass has no backward: int8 activations (W8A8) round the inputs."""
    w8a8 = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.act_mode]
    if w8a8:
        raise ValueError(
            f"peft methods cannot train a model with int8 activations ({w8a8[0]} and {len(w8a8) - 1} more linears "
            "use the 'activations' section, W8A8): the int8 activation path has no backward; quantize the weights "
            "only (drop the 'activations' section) to train adapters or biases on a quantized base"
        )


def _trainable_module_names(model: nn.Module, spec: PeftSpec) -> list[str]:
    if not spec.trainable_modules:
        return []
    matched = [n for n, _ in model.named_modules() if n and any(module_matches(n, p) for p in spec.trainable_modules)]
    if not matched:
        raise ValueError(f"peft.trainable_modules={spec.trainable_modules!r} matched no module of this model")
    quantized = [n for n in matched if any(isinstance(m, QuantLinear) for m in model.get_submodule(n).modules())]
    if quantized:
        raise ValueError(
            f"peft.trainable_modules={spec.trainable_modules!r} matched quantized linear(s) ({quantized[0]}) whose "
            "integer weights cannot train; keep them in float with quantization.modules_to_not_convert"
        )
    out = []
    for n in matched:
        out += [f"{n}.{p}" for p, t in model.get_submodule(n).named_parameters() if t.is_floating_point()]
    return out


def peft_parameter_names(model: nn.Module, spec: PeftSpec | dict[str, Any] | None = None) -> list[str]:
    """Names (as ``named_parameters()`` gives them) of the parameters the method trains, in model order."""
    spec = peft_spec(model) if spec is None else _coerce(spec)
    if spec is None:
        raise ValueError("this model carries no peft method; call apply_peft(model, spec) first")
    _check_base(model)
    if spec.method == "bitfit":
        names = bitfit_trainable_names(model, spec)
    elif spec.method == "adapters":
        names = adapter_trainable_names(model)
        if not names:
            raise ValueError("this model has no adapters; call apply_peft(model, spec) to insert them")
    else:
        names = freeze_trainable_names(model, spec)
    wanted = set(names) | set(_trainable_module_names(model, spec))
    # canonical names and order (a tied weight counts once, under its first name)
    ids = {id(model.get_parameter(n)) for n in wanted}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def mark_trainable(model: nn.Module, spec: PeftSpec | dict[str, Any] | None = None) -> list[str]:
    """Freeze every parameter, then let the method's parameters train; returns their names."""
    names = peft_parameter_names(model, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        model.get_parameter(n).requires_grad_(True)
    return names


def init_unloaded_peft_parameters(model: nn.Module, warn: bool = False) -> list[str]:
    """Initialize the added parameters that ``from_pretrained`` did not load (transformers marks
    every loaded tensor ``_is_hf_initialized``): adapters as new (identity), added biases to zero.
    ``warn``: log the names (a saved peft checkpoint should hold them). Returns the names."""
    done = []
    for name in getattr(model, ADDED_ATTR, []):
        p = model.get_parameter(name)
        if getattr(p, "_is_hf_initialized", False):
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, BottleneckAdapter):
            module.reset_parameter(attr)
        else:
            with torch.no_grad():
                p.zero_()
        done.append(name)
    if warn and done:
        logger.warning(
            f"the checkpoint has no values for {len(done)} peft parameter(s) ({done[0]}, ...); "
            "they start as new (adapters = identity, added biases = 0)"
        )
    return done


def _record_spec(model: nn.Module, spec: PeftSpec) -> None:
    """Put ``spec`` into the `EfficiencyConfig` in ``model.config.quantization_config`` (created when
    the model has none), and into the quantizer's, so it is saved and Trainer sees it."""
    config = getattr(model, "config", None)
    if config is None:
        return
    current = getattr(config, "quantization_config", None)
    if isinstance(current, dict) and current.get("quant_method") == QUANT_METHOD:
        current = EfficiencyConfig(**current)
    if current is None:
        data: dict[str, Any] = {}
    elif isinstance(current, EfficiencyConfig):
        data = current.to_dict()
    else:
        logger.warning(
            f"the model carries a {type(current).__name__}, not an EfficiencyConfig: the peft section is not recorded "
            "in config.json, so save the trained tensors with save_peft_weights"
        )
        return
    data["peft"] = spec.to_dict()
    new = EfficiencyConfig(**data)
    config.quantization_config = new
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and isinstance(getattr(quantizer, "quantization_config", None), EfficiencyConfig):
        quantizer.quantization_config = new


def apply_peft(model: nn.Module, spec: PeftSpec | dict[str, Any]) -> nn.Module:
    """Apply a parameter-efficient method to ``model`` (float, or with our quantized linears) and
    return it: build the structure, make only the method's parameters trainable, and record the
    spec in the model's `EfficiencyConfig`. Calling it again with the same spec only re-marks the
    trainable parameters."""
    spec = _coerce(spec)
    build_peft_structure(model, spec)
    mark_trainable(model, spec)
    _record_spec(model, spec)
    return model


def _counted_numel(module: nn.Module, name: str, p: torch.Tensor) -> int:
    if isinstance(module, QuantLinear):
        if name == "weight":
            return module.in_features * module.out_features  # logical weights, not packed words
        if name != "bias":
            return 0  # scales, minima, outliers, activation scale: quantization metadata
    return p.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; each shared (tied) parameter counts once. A
    `QuantLinear` weight counts as ``in x out`` weights and its scales/minima not at all."""
    seen: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = _counted_numel(module, name, p)
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: ... || all params: ... || trainable%: ...`` (peft's format)."""
    trainable, total = trainable_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
    )


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's parameters by name (detached; what :func:`save_peft_weights` writes)."""
    return {n: model.get_parameter(n).detach() for n in peft_parameter_names(model)}


def save_peft_weights(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write only the method's parameters: ``hf_efficiency_peft.safetensors`` and
    ``hf_efficiency_peft.json`` (the spec, the format version and the base model)."""
    from safetensors.torch import save_file

    from .. import __version__

    spec = peft_spec(model)
    if spec is None:
        raise ValueError("this model carries no peft method; call apply_peft(model, spec) first")
    os.makedirs(save_directory, exist_ok=True)
    state = {n: t.to("cpu").contiguous() for n, t in peft_state_dict(model).items()}
    save_file(
        state,
        os.path.join(save_directory, PEFT_WEIGHTS_NAME),
        metadata={"format": "pt", "hf_efficiency_peft_method": spec.method},
    )
    info = {
        "peft": spec.to_dict(),
        "format_version": FORMAT_VERSION,
        "hf_efficiency_version": __version__,
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "parameters": sum(t.numel() for t in state.values()),
    }
    with open(os.path.join(save_directory, PEFT_CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, sort_keys=True)
        fh.write("\n")


def load_peft_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the spec saved by :func:`save_peft_weights` to ``model`` (if it does not carry it yet)
    and load the saved tensors; names and shapes must match exactly. Returns the model."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, PEFT_CONFIG_NAME)
    weights_path = os.path.join(directory, PEFT_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found: {directory} is not a folder written by save_peft_weights")
    with open(config_path, encoding="utf-8") as fh:
        info = json.load(fh)
    version = info.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{config_path} uses format version {version}; this hf-efficiency reads up to "
            f"{FORMAT_VERSION}: upgrade with `pip install -U hf-efficiency`"
        )
    apply_peft(model, info["peft"])
    state = load_file(weights_path)
    expected = peft_parameter_names(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not fit this model: missing {len(missing)} tensor(s) {missing[:3]}, unexpected "
            f"{len(unexpected)} {unexpected[:3]} (was it saved from another architecture or layer count?)"
        )
    with torch.no_grad():
        for name in expected:
            p, value = model.get_parameter(name), state[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(
                    f"{weights_path}: {name} has shape {list(value.shape)}, the model's is {list(p.shape)}"
                )
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    return model


__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "apply_peft",
    "build_peft_structure",
    "init_unloaded_peft_parameters",
    "load_peft_weights",
    "mark_trainable",
    "peft_parameter_names",
    "peft_spec",
    "peft_state_dict",
    "print_trainable_parameters",
    "save_peft_weights",
    "trainable_parameters",
]
