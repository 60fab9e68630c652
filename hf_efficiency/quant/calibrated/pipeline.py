"""The calibrated quantization pipeline: sequential, layer by layer.

For each decoder layer: capture its linears' input statistics (inputs come from the already
quantized layers before it), fold AWQ / SmoothQuant scales into the preceding norm or linear,
quantize every selected linear with the configured method, swap in `QuantLinear` modules (and the
layer's fused mixture-of-experts tensors for a `QuantExperts`, round-to-nearest for awq/gptq), and run
the quantized layer to produce the next layer's inputs. With ``calibration.device`` set, each
layer is moved there for its turn only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...config import EfficiencyConfig, QuantizationSpec
from ...families import (
    Family,
    ScalingGroup,
    UnsupportedFamilyError,
    family_of,
    find_decoder_layers,
    fold_scales,
    require_family,
)
from ..core.mixed import allocate_bits, bits_for_module, mean_bits
from ..core.scheme import fake_quantize
from ..methods import check_quantized_finite, get_method, quantize_matrix, weight_format
from ..methods.awq import smoothquant_scales
from ..modules.experts import QuantExperts, experts_spec
from ..modules.linear import QuantLinear, outlier_count, scale_dtype_of
from ..modules.replace import (
    experts_to_quantize,
    is_conv1d,
    linearize,
    linears_to_quantize,
    output_embedding_name,
    set_submodule,
)
from .capture import (
    InputStats,
    calibration_windows,
    capture_first_layer_inputs,
    collect_layer_stats,
    collect_model_input_rms,
    run_layer,
)
from .onload import LayerOnloader

logger = logging.get_logger(__name__)

#: input rows kept per linear for the searches (a fixed random subsample; static activation scales keep more)
SAMPLE_ROWS = 1024
STATIC_SAMPLE_ROWS = 4096


@dataclass
class PipelineReport:
    """What the calibrated pipeline did, for logs and model cards."""

    seconds: float = 0.0
    calibration_tokens: int = 0
    awq_alphas: dict[str, float] = field(default_factory=dict)
    module_bits: dict[str, int] = field(default_factory=dict)
    mean_bits: float | None = None
    #: layer -> (output MSE with round-to-nearest, after tuning) for methods that tune whole layers
    tuned_error: dict[str, tuple[float, float]] = field(default_factory=dict)


# --- structure: which producer feeds which consumers (read from the family description) -------------
def scaling_groups(layer: nn.Module, family: Family, config: Any = None) -> list[tuple[ScalingGroup, list[str]]]:
    """``(group, consumer linear names)`` of a decoder layer whose input channels can be rescaled exactly,
    as the model's family describes them (see `hf_efficiency.families`)."""
    return [(g, list(g.consumers)) for g in family.groups_for(layer, config)]


@dataclass
class _Layer:
    """The `LayerContext` of one decoder layer, handed to the method's ``prepare_layer``."""

    layer: nn.Module
    prefix: str
    names: list[str]
    stats: dict[str, InputStats]
    bits: dict[str, int]
    fmt: Any
    spec: QuantizationSpec
    scale_dtype: torch.dtype
    report: PipelineReport
    family: Family | None = None
    config: Any = None

    def scaling_groups(self) -> list[tuple[ScalingGroup, list[str]]]:
        if self.family is None:
            raise UnsupportedFamilyError("scale folding needs the model's family description")
        return scaling_groups(self.layer, self.family, self.config)

    def fold(self, group: ScalingGroup, consumers: list[str], scales: torch.Tensor) -> None:
        fold_group(self.layer, group, self.family, scales)
        self.stats[consumers[0]].scale_inputs(scales)

    def attention_logit_linears(self) -> tuple[str, ...]:
        return self.family.attention_logit_linears if self.family is not None else ()

    def fake_quant(self, bits: int):
        return _fake_quant(self.spec, bits, self.scale_dtype)

    def record(self, key: str, name: str, value: Any) -> None:
        getattr(self.report, key)[name] = value


def fold_group(layer: nn.Module, group: ScalingGroup, family: Family, scales: torch.Tensor) -> None:
    """Fold ``scales`` into one scaling group of ``layer`` (exact in float)."""
    fold_scales(
        layer.get_submodule(group.producer),
        [layer.get_submodule(c) for c in group.consumers],
        scales,
        part=group.part,
        norm_weight_offset=family.norm_weight_offset,
    )


# --- the pipeline --------------------------------------------------------------------------
def _fake_quant(spec: QuantizationSpec, bits: int, dtype: torch.dtype):
    return lambda w: fake_quantize(w, bits, spec.group_size, spec.symmetric, dtype, spec.zero_point)


def _sensitivity_bits(model, config, names, windows, spec, scale_dtype) -> dict[str, int]:
    """Automatic mixed precision: measure each module's relative activation-weighted error
    ``sum (W - Q(W))^2 E[x^2] / sum W^2 E[x^2]`` at every allowed width (with the method itself for
    rtn/hqq, round-to-nearest for awq/gptq) and allocate widths to the target."""
    from tqdm.auto import tqdm

    rms = collect_model_input_rms(model, windows, names, config.calibration.batch_size)
    proxy = spec if not get_method(spec.method).calibrated else spec.with_method("rtn", clip="none")
    sizes, errors = {}, {}
    for name in tqdm(names, desc="measuring sensitivity"):
        w = model.get_submodule(name).weight.detach().float()
        sizes[name] = w.numel()
        h = rms[name].pow(2).to(w.device)
        # relative output error (noise-to-signal of the module's output): absolute errors are not
        # comparable across modules (SmolLM2, 3.0 bits from {2,3,4}, 8 windows: absolute 578 ppl,
        # relative 143, uniform 3-bit 161; benchmarks/hqq_and_mixed_screen.py)
        signal = float((w.pow(2) * h).sum()) or 1.0
        errors[name] = {}
        for bits in spec.bits_choices:
            q = quantize_matrix(w, proxy, bits, scale_dtype=scale_dtype, name=name).dequantize().to(w.device)
            errors[name][bits] = float(((w - q).pow(2) * h).sum()) / signal
    alloc = allocate_bits(sizes, errors, spec.bits_choices, spec.target_bits)
    logger.info(f"mixed precision: mean {mean_bits(alloc, sizes):.3f} bits per weight (target {spec.target_bits})")
    return alloc


def quantize_calibrated(
    model: nn.Module,
    config: EfficiencyConfig,
    tokenizer: Any,
    skip: list[str] | None,
    progress: bool = True,
    onloader: LayerOnloader | None = None,
) -> tuple[EfficiencyConfig, PipelineReport]:
    """Quantize a float model in place with the calibrated pipeline.

    With an ``onloader`` (sequential onloading, `hf_efficiency.quant.calibrated.onload`), ``model`` is a
    ``meta`` skeleton: the onloader reads each part from the checkpoint just before it is used and writes it
    out (returning it to ``meta``) as soon as it is final.

    Returns the config as applied (``module_bits`` filled in by an automatic allocation) and a
    :class:`PipelineReport`.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    config = EfficiencyConfig(**config.to_dict())  # never mutate the caller's object
    spec, cal, act = config.quantization, config.calibration, config.activations
    scale_dtype = scale_dtype_of(spec.scale_dtype)
    report = PipelineReport()
    # data-free methods (rtn, hqq without calibrated extras) reach this pipeline only through sequential
    # onloading: no calibration pass, every weight quantized as on the fly while loading
    calibrate = config.needs_calibration
    windows = calibration_windows(cal, tokenizer) if calibrate else None
    report.calibration_tokens = windows.numel() if calibrate else 0
    names = linears_to_quantize(model, skip)
    expert_names = experts_to_quantize(model, skip)
    if not names and not expert_names:
        raise ValueError(f"quantization matched no nn.Linear module (modules_to_not_convert={skip!r})")
    if onloader is not None:  # their checkpoint tensors are [in, out]
        onloader.transposed.update(f"{n}.weight" for n in names if is_conv1d(model.get_submodule(n)))
    linearize(model, names)  # GPT-2's Conv1D -> the equivalent nn.Linear
    online: dict[str, torch.Tensor] = {}
    if spec.rotation is not None:
        from .rotation import rotate_model

        online = rotate_model(model, spec.rotation, spec.rotation_seed)
        kept = [n for n in online if n not in names]
        if kept:
            raise ValueError(
                f"rotation='hadamard' rotates the input of {', '.join(kept[:3])} at run time, which only a quantized "
                "module does: remove it from modules_to_not_convert, or use rotation='hadamard-folded'"
            )
        spec.online_rotation = sorted(online) or None

    if spec.target_bits is not None:
        alloc = _sensitivity_bits(model, config, names, windows, spec, scale_dtype)
        spec.module_bits = {n: b for n, b in alloc.items() if b != spec.bits} or None
        report.mean_bits = mean_bits(alloc, {n: model.get_submodule(n).weight.numel() for n in names})
    expert_spec = experts_spec(spec) if expert_names else spec  # rtn for awq/gptq (warns once)

    layers_name, layers = find_decoder_layers(model)
    home = next(model.parameters()).device if onloader is None else torch.device("cpu")
    device = torch.device(cal.device) if cal is not None and cal.device else home
    outside = [n for n in names if not n.startswith(f"{layers_name}.")]
    late = _late_modules(model, outside) if onloader is not None else []
    if onloader is not None:  # the float parts before the layers: read, used for the first pass, written
        onloader.load(model, exclude=(layers_name, *late))
    batches = capture_first_layer_inputs(model, layers, windows, cal.batch_size) if calibrate else []
    if onloader is not None:
        onloader.release([(model, "")], exclude=(layers_name, *late))
    for b in batches:
        b.hidden = b.hidden.to(device)
        b.kwargs = {k: _to(v, device) for k, v in b.kwargs.items()}

    method = get_method(spec.method)
    smooth = act.smoothquant if act is not None else None
    family = family_of(model)
    if method.folds_input_scales or smooth is not None:
        what = f"method {method.name!r}" if method.folds_input_scales else "SmoothQuant (activations.smoothquant)"
        family = require_family(model, f"{what} folds scales into the preceding norms and linears and")
        if not family.scaling_groups:
            family.groups_for(layers[0], model.config)  # raises, naming the family and what is missing
    act_mode = act.mode if act is not None else None
    for i, layer in enumerate(tqdm(layers, desc=f"quantizing layers ({method.name})", disable=not progress)):
        prefix = f"{layers_name}.{i}."
        local = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        if onloader is not None:
            onloader.load(layer, prefix)
        if not local:
            _quantize_experts(model, [n for n in expert_names if n.startswith(prefix)], expert_spec)
            batches = _advance(layer, batches, device, home)
            if onloader is not None:
                onloader.release([(layer, prefix)])
            continue
        layer.to(device)
        max_rows = STATIC_SAMPLE_ROWS if act_mode == "static" else SAMPLE_ROWS
        stats, float_outputs = (
            collect_layer_stats(layer, batches, local, want_xtx=method.needs_hessian, max_rows=max_rows)
            if calibrate
            else ({}, [])
        )
        bits_of = {n: bits_for_module(prefix + n, spec) for n in local}

        if smooth is not None and not method.folds_input_scales:
            for group, consumers in scaling_groups(layer, family, model.config):
                if not all(c in stats for c in consumers):
                    continue  # a consumer is skipped (kept in float): leave this group alone
                st: InputStats = stats[consumers[0]]
                linears = [layer.get_submodule(c) for c in consumers]
                s = smoothquant_scales(st.absmax.cpu(), [lin.weight for lin in linears], smooth)
                fold_group(layer, group, family, s)
                st.scale_inputs(s)
        ctx = _Layer(
            layer,
            prefix,
            local,
            stats,
            bits_of,
            weight_format(spec, spec.bits, scale_dtype),
            spec,
            scale_dtype,
            report,
            family,
            model.config,
        )
        method.prepare_layer(ctx, spec.options)
        tuned = method.tune_layer(ctx, spec.options, batches, float_outputs) if method.tunes_layer else {}

        for n in local:
            lin = layer.get_submodule(n)
            st = stats.get(n)
            if n in tuned:
                q = tuned[n]
                check_quantized_finite(q, lin.weight.detach().float(), f"{prefix}{n}")
            else:
                q = quantize_matrix(
                    lin.weight,
                    spec,
                    bits_of[n],
                    scale_dtype=scale_dtype,
                    outliers=outlier_count(lin.in_features, spec.outliers),
                    hessian=None if st is None else st.hessian,
                    act_rms=None if st is None else st.rms,
                    name=f"{prefix}{n}",
                )
            module = QuantLinear.from_quantized(
                lin, q, symmetric=spec.symmetric, act_mode=act_mode, input_rotation=online.get(prefix + n)
            )
            if act_mode == "static":
                from ..core.activation import static_scale_from_samples

                module.set_input_scale(static_scale_from_samples(st.sample().abs(), act.percentile))
            set_submodule(layer, n, module)
        _quantize_experts(model, [n for n in expert_names if n.startswith(prefix)], expert_spec)
        del stats
        if method.propagates_float_outputs:
            # e.g. AWQ: its scaling is exact in float and its rounding is local; as llm-awq, the next
            # layer sees this layer's float outputs (saves one forward per layer)
            for b, h in zip(batches, float_outputs):
                b.hidden = h
            if device != home:
                layer.to(home)
        else:
            del float_outputs
            batches = _advance(layer, batches, device, home)
        # nothing of this layer may outlive it (with sequential onloading it is written and freed now): the
        # statistics (GPTQ's Hessians), the float linear just replaced, the quantized results
        del ctx, tuned, lin, st, q, module
        if onloader is not None:
            onloader.release([(layer, prefix)])

    if onloader is not None:
        for n in late:
            onloader.load(model.get_submodule(n), f"{n}.")
    if outside:
        if calibrate:
            logger.warning(
                f"{len(outside)} linear(s) outside the decoder layers ({', '.join(outside[:3])}...) are quantized "
                "without calibration statistics (round-to-nearest for awq/gptq)"
            )
        fallback = spec if not method.calibrated else spec.with_method("rtn")
        for n in outside:
            lin = model.get_submodule(n)
            q = quantize_matrix(
                lin.weight,
                fallback,
                bits_for_module(n, spec),
                scale_dtype=scale_dtype,
                outliers=outlier_count(lin.in_features, spec.outliers),
                name=n,
            )
            set_submodule(model, n, QuantLinear.from_quantized(lin, q, symmetric=spec.symmetric, act_mode=act_mode))
    if onloader is not None:
        onloader.release([(model.get_submodule(n), f"{n}.") for n in late])
    report.module_bits = {n: bits_for_module(n, spec) for n in names}
    report.seconds = time.perf_counter() - start
    return config, report


def _late_modules(model: nn.Module, outside: list[str]) -> list[str]:
    """Modules outside the decoder layers that sequential onloading reads only after the layers: the linears
    quantized there (``outside``) and a float output head with its own weight (a head tied to the input
    embedding is that embedding, read before the layers)."""
    late = list(outside)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        name = output_embedding_name(model)
        if name is not None and name not in late:
            late.append(name)
    return late


def _quantize_experts(model: nn.Module, names: list[str], spec: QuantizationSpec) -> None:
    """Swap the fused experts modules ``names`` for `QuantExperts` (no calibration statistics: calibrated
    methods fall back to round-to-nearest, see `QuantExperts.from_float`)."""
    for name in names:
        experts = QuantExperts.from_float(model.get_submodule(name), spec, name, desc=family_of(model).experts)
        set_submodule(model, name, experts)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def _advance(layer: nn.Module, batches, device, home):
    """Run the (quantized) layer on every batch; its outputs become the next layer's inputs."""
    layer.to(device)
    for b in batches:
        b.hidden = run_layer(layer, b)
    if device != home:
        layer.to(home)
    return batches
