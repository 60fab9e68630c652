"""What a quantization method is: its options (a dataclass nested in ``quantization``) and its steps.

A method is one module of this package that defines ``METHOD``, an instance of a `QuantMethod`
subclass, and is named by one line of the table in ``__init__.py``. Everything else (config
validation, the calibrated pipeline, the command line's ``--method`` choices and flags, the model
card) reads the table. The steps are pure tensor functions or act on a decoder layer through the
`LayerContext` the pipeline hands them, so a method never imports the pipeline, the config or
transformers.

    @dataclass
    class MyOptions(MethodOptions):
        rounds: int = option(3, "refinement rounds", int_in(1, 10))

    class MyMethod(QuantMethod):
        name = "mine"
        summary = "one line for --help and the model card"
        options = MyOptions

        def quantize(self, weight, fmt, options, *, exclude=None, hessian=None):
            ...  # -> (QuantizedWeight, kept outlier values or None)

    METHOD = MyMethod()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn

    from ..core.scheme import QuantizedWeight

#: a check of one option value: (predicate, description of the allowed values)
Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_in(lo: int, hi: int) -> Check:
    """An integer in ``[lo, hi]``."""
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an integer in [{lo}, {hi}]"


def positive_int() -> Check:
    """An integer >= 1."""
    return (lambda v: _is_int(v) and v >= 1), "a positive integer"


def float_open(lo: float, hi: float) -> Check:
    """A number in the open interval ``(lo, hi)``."""
    return (lambda v: _is_number(v) and lo < v < hi), f"a float in ({lo:g}, {hi:g})"


def boolean() -> Check:
    """``True`` or ``False``."""
    return (lambda v: isinstance(v, bool)), "True, False"


def option(default: Any, help: str, check: Check) -> Any:
    """A field of a method's options dataclass: its default, a one-line help (the CLI shows it)
    and the check its values must pass."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


class OptionError(ValueError):
    """A bad option value; `EfficiencyConfig` re-raises it naming the key as the user wrote it."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        super().__init__(f"{field}={value!r} is not allowed; allowed values: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


@dataclass
class MethodOptions:
    """Base of a method's options: every field is declared with :func:`option`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            predicate, allowed = f.metadata["check"]
            value = getattr(self, f.name)
            if not predicate(value):
                raise OptionError(f.name, value, allowed)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class NoOptions(MethodOptions):
    """A method without options of its own."""


@dataclass(frozen=True)
class WeightFormat:
    """How one matrix is stored and the range search every method shares (from ``quantization``)."""

    bits: int
    group_size: int | None
    symmetric: bool
    scale_dtype: torch.dtype
    clip: str = "none"
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    #: asymmetric grids: ``"float"`` (a float minimum per group) or ``"integer"`` (an integer zero point)
    zero_point: str = "float"


class LayerContext(Protocol):
    """What the calibrated pipeline offers a method for one decoder layer (see `prepare_layer`)."""

    layer: nn.Module
    prefix: str  # full name of the layer, ending in "."
    names: list[str]  # the layer's linears being quantized, relative to the layer
    stats: dict[str, Any]  # name -> input statistics (sample(), mean_abs, absmax, rms, hessian)
    bits: dict[str, int]  # name -> width
    fmt: WeightFormat  # the section's format (at its default width)

    def scaling_groups(self) -> list[tuple[Any, list[str]]]:
        """``(group, consumer names)`` whose input channels can be rescaled exactly (from the model's
        family description, `hf_efficiency.families`)."""

    def attention_logit_linears(self) -> tuple[str, ...]:
        """The separate q/k projections (relative names) whose rounding errors the softmax absorbs."""

    def fold(self, group: Any, consumers: list[str], scales: torch.Tensor) -> None:
        """Divide the producer's output channels and multiply the consumers' input columns by
        ``scales`` (the float model is unchanged), and rescale the recorded statistics."""

    def fake_quant(self, bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Round-to-nearest at ``bits`` in the section's format (min/max range): for searches."""

    def record(self, key: str, name: str, value: Any) -> None:
        """Add ``value`` under ``report[key][name]`` (shown in logs and model cards)."""


class QuantMethod:
    """Base class of the quantization methods (one instance per method, in the table)."""

    #: the name users pick (``quantization.method``, ``--method``)
    name: ClassVar[str] = ""
    #: one line for ``--help`` and the model card
    summary: ClassVar[str] = ""
    #: the method's own options, nested under its name in ``quantization``
    options: ClassVar[type[MethodOptions]] = NoOptions
    #: runs layer by layer on calibration data (else per tensor while the checkpoint loads)
    calibrated: ClassVar[bool] = False
    #: the pipeline collects each linear's input Hessian ``X^T X / n`` for it
    needs_hessian: ClassVar[bool] = False
    #: symmetric (absmax) grids allowed; ``False`` for methods that optimize a zero point
    symmetric_allowed: ClassVar[bool] = True
    #: may carry int8 activations (W8A8)
    supports_int8_activations: ClassVar[bool] = False
    #: its own input-channel scales replace SmoothQuant's (they would fold into the same tensors)
    folds_input_scales: ClassVar[bool] = False
    #: the next decoder layer is calibrated on this layer's float outputs (not its quantized ones)
    propagates_float_outputs: ClassVar[bool] = False
    #: quantizes a whole decoder layer at once against its float outputs (`tune_layer`)
    tunes_layer: ClassVar[bool] = False
    #: keeps SpQR-style outliers (``quantization.outliers``)
    supports_outliers: ClassVar[bool] = True

    def quantize(
        self,
        weight: torch.Tensor,
        fmt: WeightFormat,
        options: MethodOptions,
        *,
        exclude: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> tuple[QuantizedWeight, torch.Tensor | None]:
        """Quantize ``weight [out, in]`` (float32). ``exclude`` (bool ``[out, in]``) marks weights
        kept exactly elsewhere (outliers). Returns the packed weight and, for methods that update
        weights while rounding (GPTQ), the updated values at excluded positions (else ``None``)."""
        raise NotImplementedError

    def prepare_layer(self, ctx: LayerContext, options: MethodOptions) -> None:
        """Transform a decoder layer in float before its linears are rounded (AWQ's scales and
        clipping). The default does nothing."""

    def tune_layer(
        self, ctx: LayerContext, options: MethodOptions, batches: list[Any], targets: list[torch.Tensor]
    ) -> dict[str, QuantizedWeight]:
        """For methods with ``tunes_layer``: quantize every linear of ``ctx.names`` together so that the
        layer, run on ``batches`` (its captured inputs: ``hidden`` and forward ``kwargs``), reproduces
        ``targets`` (the float layer's outputs). Returns name -> packed weight."""
        raise NotImplementedError

    def describe(self, options: MethodOptions, clip: str) -> str:
        """How the weights were quantized, as a sentence fragment for the model card."""
        return f"`{self.name}` quantization of the linear weights"


__all__ = [
    "LayerContext",
    "MethodOptions",
    "NoOptions",
    "OptionError",
    "QuantMethod",
    "WeightFormat",
    "boolean",
    "float_open",
    "int_in",
    "option",
    "positive_int",
]
