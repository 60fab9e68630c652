"""Quantization-aware training (QAT): train a float model through the rounding it will be stored with.

* :func:`prepare_qat` swaps the linears that the quantizer would quantize (same skip rules, same
  per-module widths) for :class:`FakeQuantLinear`: a ``nn.Linear`` that keeps its trainable float
  weight but computes with the round-to-nearest weight of the scheme (min/max range per group,
  scale and minimum rounded to ``scale_dtype``), recomputed from the current weight at every
  forward. Gradients pass straight through the rounding (STE: the gradient of ``w_hat`` is
  applied to ``w``). The result is an ordinary float model: a stock ``transformers.Trainer``
  trains it, and ``save_pretrained`` writes ordinary float weights (re-quantizing those with
  ``from_pretrained(path, efficiency_config=...)`` gives exactly the model :func:`convert_qat` gives).
* :func:`convert_qat` replaces every `FakeQuantLinear` by a packed `QuantLinear` holding exactly
  the weights the QAT model computed with, and attaches the `EfficiencyConfig` and a
  pre-quantized `EfficiencyHfQuantizer` as ``from_pretrained`` does, so ``save_pretrained`` writes
  our packed checkpoint and a plain ``AutoModelForCausalLM.from_pretrained`` reloads it.

Only ``method="rtn"`` with ``clip="none"`` and no outliers is trained: the other methods and the
clip search choose scales or codes that a per-forward min/max rounding does not reproduce, so
the trained weights would be rounded differently at conversion than during training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import SECTIONS, EfficiencyConfig, QuantizationSpec, saved_section
from ..core.mixed import bits_for_module
from ..core.scheme import dequantize_codes, integer_zero, minmax_codes
from .linear import QuantLinear, scale_dtype_of
from .replace import linearize, linears_to_quantize, modules_to_not_convert, set_submodule

#: attribute of a prepared model holding its `EfficiencyConfig`
QAT_ATTRIBUTE = "hf_efficiency_qat"


def fake_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    dtype: torch.dtype | None = None,
    zero_point: str = "float",
) -> torch.Tensor:
    """The weight ``[out, in]`` a `QuantLinear` quantized from ``weight`` computes with, in ``dtype``
    (default: the weight's), without packing. Scale and minimum come from each group's min/max and
    are rounded to ``scale_dtype``; the reconstruction is the dequantization `QuantLinear` runs, so
    the result is bit-identical to ``QuantLinear.from_linear(...).dequantize_weight(dtype)`` (with the
    same ``zero_point``)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    dtype = dtype or weight.dtype
    codes, scale, minimum = minmax_codes(weight, bits, group_size, symmetric, scale_dtype, zero_point)
    zero = None
    if minimum is not None and zero_point == "integer":
        zero, minimum = integer_zero(minimum, scale, bits).squeeze(-1), None
    return dequantize_codes(
        codes,
        scale.squeeze(-1),
        None if minimum is None else minimum.squeeze(-1),
        bits,
        group_size,
        dtype,
        zero=zero,
    )


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight (exactly, no ``w + (q - w)`` round-off); backward: the
    identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight, bits, group_size, symmetric, scale_dtype, dtype, zero_point="float"):
        ctx.weight_dtype = weight.dtype
        return fake_quantize_weight(weight, bits, group_size, symmetric, scale_dtype, dtype, zero_point)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.weight_dtype), None, None, None, None, None, None


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` that trains a float weight but computes with its round-to-nearest quantization.

    The forward uses :func:`fake_quantize_weight` of the current weight (scale and minimum
    recomputed every call), in the input's dtype, and the straight-through estimator in the
    backward. State dict keys are those of ``nn.Linear`` (``weight``, ``bias``).

    Args:
        bits: code width (8, 4, 3 or 2).
        group_size: weights per scale along the input dimension, or ``None`` (per output channel).
        symmetric: absmax scale with an implicit zero point, or scale and minimum per group.
        scale_dtype: storage dtype of the scales and minima (they are rounded to it).
    """

    hf_efficiency_fake_quantized = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        scale_dtype: torch.dtype = torch.float16,
        zero_point: str = "float",
    ) -> None:
        if isinstance(bits, bool) or bits not in QuantizationSpec.BITS:
            raise ValueError(
                f"bits={bits!r} is not allowed; allowed values: {', '.join(map(str, QuantizationSpec.BITS))}"
            )
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(f"group_size={group_size!r} is not allowed; allowed values: None or a positive integer")
        if zero_point not in ("float", "integer") or (symmetric and zero_point == "integer"):
            raise ValueError(
                f"zero_point={zero_point!r} is not allowed; allowed values: 'float'"
                + ("" if symmetric else ", 'integer'")
            )
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits = bits
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.scale_dtype = scale_dtype
        self.zero_point = zero_point

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        scale_dtype: torch.dtype = torch.float16,
        zero_point: str = "float",
    ) -> FakeQuantLinear:
        """A fake-quantized layer sharing ``linear``'s weight and bias parameters (no copy)."""
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            zero_point=zero_point,
        )
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)
        return module

    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer computes with (no gradient), in ``dtype`` (default: the weight's)."""
        return fake_quantize_weight(
            self.weight, self.bits, self.group_size, self.symmetric, self.scale_dtype, dtype, self.zero_point
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _StraightThrough.apply(
            self.weight, self.bits, self.group_size, self.symmetric, self.scale_dtype, x.dtype, self.zero_point
        )
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def to_quant_linear(self) -> QuantLinear:
        """A packed `QuantLinear` computing with exactly this layer's fake-quantized weight."""
        with torch.no_grad():
            return QuantLinear.from_linear(
                self,
                bits=self.bits,
                group_size=self.group_size,
                symmetric=self.symmetric,
                scale_dtype=self.scale_dtype,
                zero_point=self.zero_point,
            )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's float (unquantized) weight and bias."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta", dtype=self.weight.dtype
        )
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        extra = ", zero_point='integer'" if self.zero_point == "integer" else ""
        return (
            f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}{extra}"
        )


def _qat_config(config: EfficiencyConfig | QuantizationSpec | dict[str, Any]) -> EfficiencyConfig:
    """A validated copy of ``config`` that QAT can train (see the module docstring)."""
    if isinstance(config, QuantizationSpec):
        config = EfficiencyConfig(quantization=config)
    elif isinstance(config, dict):
        config = EfficiencyConfig(**config)
    elif not isinstance(config, EfficiencyConfig):
        raise TypeError(
            f"config must be an EfficiencyConfig, a QuantizationSpec or a dict, got {type(config).__name__}"
        )
    else:
        config = EfficiencyConfig(**config.to_dict())  # never mutate the caller's object
    spec = config.quantization
    if spec is None:
        raise ValueError(
            "quantization-aware training needs a 'quantization' section, e.g. "
            "{'quantization': {'bits': 3, 'group_size': 64}}"
        )
    if spec.method != "rtn":
        raise ValueError(
            f"quantization.method={spec.method!r} is not supported by quantization-aware training; allowed values: "
            "'rtn' (QAT trains the weights through round-to-nearest, which is also how convert_qat stores them)"
        )
    if spec.clip != "none":
        raise ValueError(
            f"quantization.clip={spec.clip!r} is not supported by quantization-aware training; allowed values: 'none' "
            "(the clip search would round the trained weights differently from the training forward)"
        )
    if spec.outliers:
        raise ValueError(
            f"quantization.outliers={spec.outliers} is not supported by quantization-aware training; allowed values: 0"
        )
    if spec.target_bits is not None:
        raise ValueError(
            f"quantization.target_bits={spec.target_bits} is not supported by quantization-aware training (it needs "
            "calibration); give the per-module widths explicitly with module_bits"
        )
    if getattr(config, "activations", None) is not None:
        raise ValueError("quantization-aware training quantizes weights only; remove the 'activations' section")
    if getattr(config, "peft", None) is not None:
        raise ValueError(
            "quantization-aware training fine-tunes the float weights themselves; a 'peft' section is not supported "
            "with prepare_qat (apply the peft method to the converted model instead)"
        )
    return config


def fake_quant_modules(model: nn.Module) -> list[str]:
    """Names of the `FakeQuantLinear` modules of ``model``, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def prepare_qat(model: nn.Module, config: EfficiencyConfig | QuantizationSpec | dict[str, Any]) -> nn.Module:
    """Make ``model`` (a float transformers model) quantization-aware, in place, and return it.

    Every ``nn.Linear`` that ``from_pretrained(..., efficiency_config=config)`` would quantize (same
    ``modules_to_not_convert`` rules: ``lm_head`` and tied weights stay float by default; widths
    from ``module_bits``) becomes a `FakeQuantLinear` sharing the linear's parameters (dtype,
    device and ``requires_grad`` are kept). The validated config is stored as
    ``model.hf_efficiency_qat``; ``model.config`` is not changed, so checkpoints saved while
    training are ordinary float checkpoints.

    Args:
        model: a float ``PreTrainedModel`` (not quantized, not already prepared).
        config: an `EfficiencyConfig`, its dict form (``{"quantization": {"bits": 3, "group_size": 64}}``)
            or a `QuantizationSpec`. ``method`` must be ``"rtn"`` with ``clip="none"``, no
            ``outliers``, no ``target_bits`` and no ``activations`` section.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"prepare_qat needs a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model, QAT_ATTRIBUTE, None) is not None or fake_quant_modules(model):
        raise ValueError("prepare_qat was already applied to this model; call it once (convert_qat finishes it)")
    quantizer = getattr(model, "hf_quantizer", None)
    weights_quantized = (
        quantizer is not None and getattr(quantizer.quantization_config, "quantization", True) is not None
    )
    if weights_quantized or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(
            "prepare_qat needs a float model, but this model is already quantized; load the float checkpoint "
            "(without a quantization section in efficiency_config) and prepare that"
        )
    config = _qat_config(config)
    # keep the other sections (attention, speculative, ...) of an EfficiencyConfig the model already carries
    carried = {name: section.to_dict() for name in SECTIONS if (section := saved_section(model, name)) is not None}
    if carried:
        config = _qat_config({**carried, **config.to_dict()})
    spec = config.quantization
    skip = modules_to_not_convert(model, config.quantization)
    names = linears_to_quantize(model, skip)
    if not names:
        raise ValueError(
            f"quantization matched no nn.Linear module (modules_to_not_convert={skip!r}); nothing would be trained "
            "quantization-aware"
        )
    linearize(model, names)  # GPT-2's Conv1D -> the equivalent nn.Linear
    scale_dtype = scale_dtype_of(spec.scale_dtype)
    for name in names:
        linear = model.get_submodule(name)
        fq = FakeQuantLinear.from_linear(
            linear,
            bits=bits_for_module(name, spec),
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            scale_dtype=scale_dtype,
            zero_point=spec.zero_point,
        )
        set_submodule(model, name, fq)
    setattr(model, QAT_ATTRIBUTE, config)
    return model


def convert_qat_modules(model: nn.Module) -> tuple[EfficiencyConfig, list[str]]:
    """Replace every `FakeQuantLinear` of ``model`` by a packed `QuantLinear`, in place, computing with
    exactly the weights the QAT model computed with; returns the recorded config and the converted
    names. `hf_efficiency.convert_qat` then makes the model save and reload like a quantized one."""
    names = fake_quant_modules(model)
    if not names:
        raise ValueError("convert_qat found no FakeQuantLinear module: call prepare_qat(model, config) and train first")
    config = getattr(model, QAT_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            "convert_qat needs the config recorded by prepare_qat (model.hf_efficiency_qat is missing); "
            "FakeQuantLinear layers inserted by hand cannot be converted"
        )
    spec = config.quantization
    scale_dtype = scale_dtype_of(spec.scale_dtype)
    # what from_pretrained will rebuild from the saved config must be exactly what is converted here
    expected_names = linears_to_quantize(model, modules_to_not_convert(model, config.quantization))
    if expected_names != names:
        raise ValueError(
            f"the FakeQuantLinear modules {names} are not the linears the recorded config quantizes "
            f"({expected_names}); the saved checkpoint would not reload (were modules replaced after prepare_qat?)"
        )
    for name in names:
        fq = model.get_submodule(name)
        expected = (bits_for_module(name, spec), spec.group_size, spec.symmetric, scale_dtype, spec.zero_point)
        got = (fq.bits, fq.group_size, fq.symmetric, fq.scale_dtype, getattr(fq, "zero_point", "float"))
        if got != expected:
            raise ValueError(
                f"{name} is a FakeQuantLinear with bits={fq.bits}, group_size={fq.group_size}, "
                f"symmetric={fq.symmetric}, scale_dtype={fq.scale_dtype}, zero_point={got[4]!r}, but the recorded "
                f"config gives (bits, group_size, symmetric, scale_dtype, zero_point)={expected}; the saved "
                "checkpoint would not reload"
            )
    for name in names:
        quant = model.get_submodule(name).to_quant_linear()
        quant.requires_grad_(False)
        set_submodule(model, name, quant)
    delattr(model, QAT_ATTRIBUTE)
    return EfficiencyConfig(**config.to_dict()), names
