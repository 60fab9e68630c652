"""What every community-format reader shares: describing the modules it read, checking the tensors
against the model they are meant for, and building the model through transformers' own loader.

A reader turns a foreign checkpoint into

* ``state_dict``: our checkpoint keys (``<module>.weight`` packed int32, ``weight_scale``,
  ``weight_min`` or uint8 ``weight_zero``, ``weight_perm``; float tensors under transformers' names), and
* ``formats``: ``{module name: {"bits", "group_size", "symmetric", "scale_dtype", "act_order",
  "zero_point"}}`` for every linear it stores quantized,

and :func:`load_model` builds the model from them with ``from_pretrained(None, config=...,
state_dict=...)``: our quantizer then sees a pre-quantized checkpoint, so the model is exactly what
loading our own safetensors gives (saving, pushing, PEFT and the kernels all work unchanged).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import EfficiencyConfig, QuantizationSpec
from ..quant.core.scheme import QuantizedWeight
from ..quant.modules.linear import QuantLinear
from ..quant.modules.replace import replace_with_quant_linear
from .safetensors_header import CheckpointError

logger = logging.get_logger(__name__)

#: `QuantLinear` tensors whose dtype is part of the format (floats such as the bias are cast on load)
PACKED_TENSORS = (
    "weight",
    "weight_scale",
    "weight_min",
    "weight_zero",
    "weight_perm",
    "weight_outlier_index",
    "weight_outlier_value",
)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class FormatError(CheckpointError):
    """A community checkpoint uses something we cannot read exactly, or its tensors are inconsistent."""


def format_of(q: QuantizedWeight, symmetric: bool) -> dict[str, Any]:
    """The ``module_formats`` entry describing ``q``."""
    return {
        "bits": q.bits,
        "group_size": q.group_size,
        "symmetric": symmetric,
        "scale_dtype": _DTYPE_NAMES[q.scale.dtype],
        "act_order": q.perm is not None,
        "zero_point": "integer" if q.zero is not None else "float",
    }


def quantized_tensors(module_name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Our checkpoint keys for the quantized weight of ``module_name``."""
    out = {f"{module_name}.weight": q.packed, f"{module_name}.weight_scale": q.scale}
    if q.minimum is not None:
        out[f"{module_name}.weight_min"] = q.minimum
    if q.zero is not None:
        out[f"{module_name}.weight_zero"] = q.zero.to(torch.uint8)
    if q.perm is not None:
        out[f"{module_name}.weight_perm"] = q.perm.to(torch.int32)
    return out


def efficiency_config_for(formats: dict[str, dict[str, Any]], float_linears: list[str]) -> EfficiencyConfig:
    """An `EfficiencyConfig` whose quantization section reproduces ``formats``: the most common format
    is the section's own, the others are ``module_formats`` entries; ``float_linears`` stay float."""
    if not formats:
        raise FormatError("the checkpoint holds no quantized linear layer")
    key = lambda f: tuple(sorted(f.items()))
    common = dict(Counter(key(f) for f in formats.values()).most_common(1)[0][0])
    bits = common["bits"] if common["bits"] in QuantizationSpec.BITS else 4
    spec = {
        "method": "rtn",
        "bits": bits,
        "group_size": common["group_size"] if _plain_group(common["group_size"]) else 128,
        "symmetric": common["symmetric"],
        "zero_point": common.get("zero_point", "float"),
        "scale_dtype": common["scale_dtype"],
        "modules_to_not_convert": sorted(float_linears),
    }
    probe = QuantizationSpec(**spec)
    module_formats = {name: f for name, f in formats.items() if probe.format_of(name) != f}
    if module_formats:
        spec["module_formats"] = dict(sorted(module_formats.items()))
    return EfficiencyConfig(quantization=spec)


def _plain_group(g: int | None) -> bool:
    return g is None or (32 <= g <= 256 and g % 32 == 0)


def concrete_class(config, model_class=None):
    """The model class to build: ``model_class`` itself, or the class an Auto class (default
    ``AutoModelForCausalLM``) maps ``config`` to."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _BaseAutoModelClass, _get_model_class

    cls = model_class or AutoModelForCausalLM
    if isinstance(cls, type) and issubclass(cls, _BaseAutoModelClass):
        if type(config) not in cls._model_mapping:
            raise FormatError(f"{cls.__name__} has no model class for {type(config).__name__}")
        cls = _get_model_class(config, cls._model_mapping)
    return cls


#: config keys counting modules the model builds, each of which holds at least one tensor of the checkpoint
MODULE_COUNT_KEYS = (
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
)


def check_module_counts(config, n_tensors: int, source: str) -> None:
    """Raise `FormatError` when ``config`` (or a sub-config) claims more layers or experts than the checkpoint
    has tensors: a corrupt count (``num_hidden_layers=2**31``) must not make us build that many modules."""
    stack = [config.to_dict() if hasattr(config, "to_dict") else dict(config)]
    while stack:
        d = stack.pop()
        for key, value in d.items():
            if isinstance(value, dict):
                stack.append(value)
            elif key in MODULE_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                if value > max(n_tensors, 1) or value < 0:
                    raise FormatError(
                        f"{source}: the model config says {key}={value}, but the checkpoint holds {n_tensors} "
                        "tensors; the config is corrupt or belongs to another checkpoint"
                    )


def meta_model(config, model_class=None, *, source: str = "checkpoint", n_tensors: int | None = None) -> nn.Module:
    """The model ``config`` describes, built on the meta device (nothing allocated). With ``n_tensors`` (the
    checkpoint's tensor count) absurd layer/expert counts are refused first. A config transformers cannot
    build a model from (a corrupt or foreign one) is a `FormatError` naming ``source``."""
    if n_tensors is not None:
        check_module_counts(config, n_tensors, source)
    cls = concrete_class(config, model_class)
    try:
        with torch.device("meta"):
            return cls._from_config(config)
    except Exception as exc:  # noqa: BLE001 - transformers' model code raises anything on a nonsensical config
        raise FormatError(
            f"{source}: transformers cannot build {cls.__name__} from the model config "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def skeleton(config, qcfg: EfficiencyConfig, model_class=None) -> nn.Module:
    """The model ``config`` describes on the meta device, with ``qcfg``'s `QuantLinear` shells."""
    model = meta_model(config, model_class)
    spec = qcfg.quantization
    replace_with_quant_linear(model, spec, spec.modules_to_not_convert)
    return model


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise `FormatError` naming the first tensor that is missing, misshaped or of the wrong dtype;
    warn about unused ones. Tied parameters may be absent."""
    expected = model.state_dict()
    tied = _tied_keys(model)
    for name, ref in expected.items():
        if name not in state_dict:
            if name in tied:
                continue
            raise FormatError(f"{source}: tensor {name!r} is missing (expected shape {list(ref.shape)})")
        got = state_dict[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise FormatError(
                f"{source}: tensor {name!r} has shape {list(got.shape)}, expected {list(ref.shape)} for this model"
            )
        if name.rpartition(".")[2] in PACKED_TENSORS and _is_quantized_key(model, name):
            if got.dtype != ref.dtype:
                raise FormatError(f"{source}: tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}")
        elif ref.is_floating_point() and not got.is_floating_point():  # a float tensor is cast on load, an int is not
            raise FormatError(f"{source}: tensor {name!r} has dtype {got.dtype}, expected a floating-point tensor")
    unused = sorted(set(state_dict) - set(expected))
    if unused:
        logger.warning(f"{source}: {len(unused)} tensor(s) not used by the model: {', '.join(unused[:8])}")


def _tied_keys(model: nn.Module) -> set[str]:
    keys = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(model.config, "tie_word_embeddings", False):
        name = next((n for n, m in model.named_modules() if m is out), None)
        if name is not None:
            keys.add(f"{name}.weight")
    return keys


def _is_quantized_key(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(module_name), QuantLinear)
    except AttributeError:
        return False


def load_model(
    config,
    state_dict: dict[str, torch.Tensor],
    qcfg: EfficiencyConfig,
    *,
    source: str,
    model_class=None,
    check: bool = True,
    **from_pretrained_kwargs: Any,
):
    """Build the model from a reader's ``state_dict`` through ``from_pretrained`` (pre-quantized path).

    ``config`` must not carry a foreign ``quantization_config``; it is given ``qcfg``, plus the other
    `EfficiencyConfig` sections in ``from_pretrained_kwargs["sections"]`` (``{"attention": ...}``) if any.
    Other keyword arguments (``dtype``, ``device_map``, ``attn_implementation`` ...) go to ``from_pretrained``.
    """
    sections = from_pretrained_kwargs.pop("sections", None) or {}
    if sections:
        qcfg = EfficiencyConfig(**{**qcfg.to_dict(), **{k: v for k, v in sections.items()}})
    if check:
        check_state_dict(skeleton(config, qcfg, model_class), state_dict, source)
    config.quantization_config = qcfg.to_dict()
    cls = concrete_class(config, model_class)
    from_pretrained_kwargs.setdefault("dtype", torch.float32)
    return cls.from_pretrained(None, config=config, state_dict=state_dict, **from_pretrained_kwargs)
