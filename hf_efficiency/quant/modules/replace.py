"""Swap `nn.Linear` layers of a model for `QuantLinear`, and a mixture-of-experts family's fused experts modules
for `QuantExperts` (structure only; no tensor math here)."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.utils import logging

from ...config import QuantizationSpec
from ...families import (
    config_and_text_config,
    conv1d_to_linear,
    family_of,
    find_decoder_layers,
    is_conv1d,
    output_embedding_name,
)
from .experts import QuantExperts
from .linear import QuantLinear, outlier_count, scale_dtype_of

logger = logging.get_logger(__name__)


def is_skipped(name: str, patterns: list[str] | None) -> bool:
    """True when ``name`` matches a pattern: a prefix up to a module boundary, a regex from the
    start (with the same boundary), or a suffix (transformers' ``modules_to_not_convert`` rules)."""
    if not patterns:
        return False
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def tied_output_embedding(model: nn.Module) -> nn.Module | None:
    """The output head when it shares its weight with the input embeddings (``tie_word_embeddings``)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return None
    return model.get_output_embeddings()


def tied_head_name(model: nn.Module, skip: list[str] | None) -> str | None:
    """The name of the output head when it is tied to the input embeddings and ``skip`` does not keep it float
    (an explicit choice: ``modules_to_not_convert`` without it), else ``None``."""
    name = output_embedding_name(model) if tied_output_embedding(model) is not None else None
    return None if name is None or is_skipped(name, skip) else name


def untie_output_embedding(model: nn.Module, name: str, *, copy: bool) -> nn.Linear:
    """Give the tied output head ``name`` its own ``nn.Linear`` (the embedding matrix, cloned when ``copy``, else
    shared until the head is replaced) and record ``tie_word_embeddings=False`` in the model's config, so that
    transformers neither re-ties it nor drops its tensors when saving. Returns the new head."""
    head = model.get_submodule(name)
    weight = model.get_input_embeddings().weight
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(head, "bias", None) is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone() if copy else weight.detach(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=False)
    set_submodule(model, name, linear)
    for config in config_and_text_config(model.config):
        config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return linear


def modules_to_not_convert(model: nn.Module, spec: QuantizationSpec) -> list[str]:
    """Module names/patterns kept in float: ``spec.modules_to_not_convert`` when given, else
    transformers' own default (the output embedding and the model's ``_keep_in_fp32_modules``),
    exactly as the quantizer applies it, plus the family's never-quantized modules (routers)."""
    if spec.modules_to_not_convert is not None:
        return list(spec.modules_to_not_convert)
    from transformers.quantizers.base import HfQuantizer

    keep = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    family = family_of(model)
    extra = [n for n in (family.never_quantize if family is not None else ()) if n not in keep]
    return list(keep) + extra


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (the layers quantization replaces)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return module.in_features, module.out_features


def linearize(model: nn.Module, names: list[str]) -> int:
    """Replace each ``Conv1D`` among ``names`` by the ``nn.Linear`` computing the same (exact), so that the
    quantization code sees one layout; returns how many were replaced."""
    count = 0
    for name in names:
        module = model.get_submodule(name)
        if is_conv1d(module):
            set_submodule(model, name, conv1d_to_linear(module))
            count += 1
    return count


def linears_to_quantize(model: nn.Module, skip: list[str] | None) -> list[str]:
    """Names of the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules that the spec quantizes, in model order. A
    head tied to the input embeddings stays float even when no pattern keeps it (its weight is the embedding
    matrix)."""
    tied = tied_output_embedding(model)
    names = []
    for n, m in model.named_modules():
        if not is_linear(m) or is_skipped(n, skip):
            continue
        if m is tied:
            logger.warning(f"{n} is tied to the input embeddings (tie_word_embeddings=True): it stays float")
            continue
        names.append(n)
    return names


def experts_to_quantize(model: nn.Module, skip: list[str] | None) -> list[str]:
    """Names of the fused mixture-of-experts modules (``family.experts.module`` of each decoder layer that has
    one) that the spec quantizes, in model order; empty for families without experts."""
    family = family_of(model)
    if family is None or family.experts is None:
        return []
    layers_name, layers = find_decoder_layers(model)
    names = []
    for i, layer in enumerate(layers):
        try:
            module = layer.get_submodule(family.experts.module)
        except AttributeError:  # a dense layer (decoder_sparse_step, mlp_only_layers)
            continue
        name = f"{layers_name}.{i}.{family.experts.module}"
        if not isinstance(module, QuantExperts) and not is_skipped(name, skip):
            names.append(name)
    return names


def replace_with_quant_experts(model: nn.Module, spec: QuantizationSpec, names: list[str]) -> list[str]:
    """Replace the fused experts modules ``names`` by empty `QuantExperts` shells on their own device (meta during
    ``from_pretrained``); returns the names of the per-expert `QuantLinear` modules they hold."""
    desc = family_of(model).experts
    linears = []
    for name in names:
        shell = QuantExperts.shell(model.get_submodule(name), spec, name, desc=desc)
        set_submodule(model, name, shell)
        linears += [f"{name}.{n}" for n, m in shell.named_modules() if isinstance(m, QuantLinear)]
    return linears


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_quant_linear(
    model: nn.Module,
    spec: QuantizationSpec,
    skip: list[str] | None,
    act_mode: str | None = None,
    *,
    experts: bool = True,
) -> list[str]:
    """Replace the selected linears by empty `QuantLinear` shells on the linears' own device
    (meta during ``from_pretrained``), with each module's format (``module_bits``, ``module_formats``),
    outlier count and activation mode, and (``experts=True``) the family's fused experts modules by
    `QuantExperts` shells (weight-only). Returns the names of every `QuantLinear` made, per-expert ones
    included; raises if nothing matched."""
    names = linears_to_quantize(model, skip)
    expert_names = experts_to_quantize(model, skip)
    if not names and not expert_names:
        raise ValueError(
            f"quantization matched no nn.Linear module (modules_to_not_convert={skip!r}); nothing would be quantized"
        )
    for name in names:
        set_submodule(model, name, quant_linear_shell(model.get_submodule(name), spec, name, act_mode))
    if experts:
        names = names + replace_with_quant_experts(model, spec, expert_names)
    return names


def quant_linear_shell(
    linear: nn.Module, spec: QuantizationSpec, name: str, act_mode: str | None = None
) -> QuantLinear:
    """An empty `QuantLinear` with the format ``spec`` gives module ``name`` (``module_bits``, ``module_formats``,
    outliers, activation mode), on ``linear``'s device."""
    fmt = spec.format_of(name)
    in_features, out_features = linear_features(linear)
    shell = QuantLinear(
        in_features,
        out_features,
        linear.bias is not None,
        bits=fmt["bits"],
        group_size=fmt["group_size"],
        symmetric=fmt["symmetric"],
        scale_dtype=scale_dtype_of(fmt["scale_dtype"]),
        bias_dtype=linear.weight.dtype,
        device=linear.weight.device,
        outliers=outlier_count(in_features, spec.outliers),
        act_mode=act_mode,
        act_order=fmt["act_order"],
        zero_point=fmt.get("zero_point", "float"),
        input_rotation=name in (spec.online_rotation or ()),
    )
    shell.requires_grad_(False)
    if is_conv1d(linear):
        shell.source_layout = "conv1d"  # a float checkpoint stores this weight [in, out]: QuantizeOp transposes
    return shell


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every `QuantExperts` by its original fused module and every other `QuantLinear` by an
    ``nn.Linear``, holding the dequantized weights; returns how many modules were replaced."""
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantExperts)]
    for name in experts:
        set_submodule(model, name, model.get_submodule(name).to_float(dtype))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear(dtype))
    return len(experts) + len(names)
