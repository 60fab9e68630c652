"""`EfficiencyConfig`: the one configuration object of hf-efficiency.

Every method is a *section* of `EfficiencyConfig` (a validated dataclass). The config is a
registered `transformers` quantization config (``quant_method="hf_efficiency"``), so it travels in
``config.json["quantization_config"]`` and a plain ``from_pretrained`` rebuilds the model.

Later features add sections with :func:`register_section`; each section validates itself and
raises ``ValueError`` naming the key and the allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from .constants import KV_BITS, QUANT_BITS, QUANT_METHOD, ROTATIONS, SCALE_DTYPES, STORAGE_BITS

#: Version of the on-disk format written by this installation. Bumped on incompatible changes:
#: 2 added methods hqq/awq/gptq, outliers, mixed precision and int8 activations; 3 added
#: ``quantization.module_formats`` (5/6-bit codes, any group size, per-module scale dtype, act-order
#: ``weight_perm``), written by the community-format readers (GGUF, GPTQ, AWQ, compressed-tensors); 4 added
#: ``quantization.zero_point`` (integer zero points, the uint8 ``weight_zero`` tensor); 5 added quantized
#: mixture-of-experts (`QuantExperts`: ``...experts.gate_up_projs.<e>.*`` / ``down_projs.<e>.*``), which an older
#: reader would silently skip, leaving random experts: it must refuse instead.
FORMAT_VERSION = 5


def _fail(section: str, key: str, value: Any, allowed: str) -> None:
    text = repr(value)
    if len(text) > 200:  # a value read from a corrupt config.json can be huge
        text = text[:197] + "..."
    raise ValueError(f"{section}.{key}={text} is not allowed; allowed values: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_choice(section: str, key: str, value: Any, choices: tuple[int, ...]) -> None:
    """``value`` must be an ``int`` (not a bool, not a float such as ``4.0``) among ``choices``."""
    allowed = ", ".join(map(str, choices))
    if not _is_int(value):
        _fail(section, key, value, f"{allowed} ({key.rpartition('.')[2]} must be an int, got {type(value).__name__})")
    if value not in choices:
        _fail(section, key, value, allowed)


def _check_patterns(section: str, key: str, value: Any) -> None:
    """Module-name patterns are matched as regexes: each must compile."""
    for pattern in value:
        try:
            re.compile(rf"(?:{pattern})")
        except (re.error, RecursionError, OverflowError) as exc:
            _fail(section, key, value, f"module names or valid regexes ({pattern!r} is not a regex: {exc})")


def _sorted_keys(keys: Any) -> list[str]:
    return sorted(map(repr, keys))


class Section:
    """Base of config sections: `from_dict` with unknown-key checking, `to_dict`, `validate`."""

    section_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Any) -> "Section":
        if isinstance(data, cls):
            return copy.deepcopy(data)
        if not isinstance(data, dict):
            raise ValueError(
                f"section {cls.section_name!r} must be a dict or {cls.__name__}, got {type(data).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = _sorted_keys(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} in section {cls.section_name!r}; allowed keys: {', '.join(names)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass


@dataclass
class QuantizationSpec(Section):
    """Weight quantization of linear layers.

    Args:
        method: the algorithm. ``"rtn"`` (round-to-nearest, optionally with a clip search) and
            ``"hqq"`` (half-quadratic zero/scale optimization) need no calibration data and run
            per tensor while the checkpoint loads; ``"awq"`` (activation-aware scales folded into
            the preceding norm/linear, plus an output-aware clip search) and ``"gptq"``
            (Hessian-based rounding with error compensation) run layer by layer on the
            ``calibration`` data.
        bits: integer width of stored weights: 8, 4, 3 or 2 (the default for every module).
        group_size: weights per scale along the input dimension (32-256), or ``None`` for one
            scale per output channel. A width that is not a multiple of the group size ends with
            a partial group (576 = 4 x 128 + 64): it is stored and computed exactly.
        symmetric: absmax scaling with an implicit zero point (``True``) or a scale and a
            stored minimum per group (``False``). ``hqq`` is asymmetric only.
        zero_point: how an asymmetric group stores its offset: ``"float"`` (default; a float minimum
            ``m`` in ``scale_dtype``, ``w = u * s + m``) or ``"integer"`` (an integer zero point ``z`` in
            ``[0, 2**bits - 1]`` stored as uint8, ``w = (u - z) * s``: the grid of GPTQ, AWQ,
            compressed-tensors and vLLM's kernels, so the model exports to them exactly, and 8 instead of
            16 bits per group). Every method supports both. Only meaningful with ``symmetric=False``;
            ``zero_point="integer"`` with ``symmetric=True`` raises.
        clip: ``"none"`` (use the full range; default) or ``"mse"`` (search a shrink ratio of the
            range per group that minimizes the squared weight reconstruction error; for ``gptq``
            it applies when each group's parameters are fitted). ``awq`` has its own output-aware
            clip search (``awq_clip``).
        clip_grid: number of shrink ratios tried by the clip searches.
        clip_max_shrink: the smallest ratio tried is ``1 - clip_max_shrink``.
        scale_dtype: storage dtype of scales and minima.
        modules_to_not_convert: module names or patterns kept in float (prefix, suffix or regex
            match, as in transformers). ``None`` keeps the output embedding (``lm_head``); an
            explicit list replaces that default, so ``[]`` quantizes the head too (at the width
            ``module_bits`` gives it, e.g. ``{"lm_head": 8}``). A head tied to the input embeddings is
            then untied (``tie_word_embeddings=False``, saved so): it gets its own quantized copy of the
            matrix and the input embedding stays float. Input embeddings are never quantized.
        outliers: fraction of the weights of every row kept exactly in float16 beside the
            low-bit codes (SpQR-style; ``0.01`` = 1 %), chosen by sensitivity (``|w|`` times the
            input channel's RMS activation when calibration data is available, ``|w|`` otherwise)
            and excluded from the group ranges. ``0`` disables it.
        module_bits: per-module bit widths overriding ``bits``: ``{pattern: bits}`` where a
            pattern is a full module name, a ``.``-suffix of it (``"down_proj"``) or a regex
            matched against the whole name; the first matching pattern wins.
        target_bits: automatic mixed precision: choose each module's width from ``bits_choices``
            so that the parameter-weighted mean code width is at most ``target_bits``, upgrading
            the modules whose measured relative output error (activation-weighted squared weight
            error over the module's output energy) drops most per bit. The result is written into ``module_bits``. Needs calibration data.
        bits_choices: widths the automatic allocation may use.
        options: the selected method's own options, nested under the method's name in dicts and
            ``config.json``: ``{"method": "gptq", "gptq": {"act_order": True}}``. Each method declares
            them (``hf_efficiency.quant.methods``): ``awq`` ``{grid, clip}``, ``gptq`` ``{damp,
            act_order, block_size}``, ``hqq`` ``{iters, optimize_scale}``; ``rtn`` has none. Missing
            keys take their defaults. The flat keys of earlier versions (``gptq_act_order``,
            ``awq_grid``, ``hqq_iters``, ...) still load: the selected method's are moved into its
            options, another method's are checked and dropped (they never had an effect).
        module_formats: storage format of individual modules, by full module name: ``{name: {"bits",
            "group_size", "symmetric", "scale_dtype", "act_order", "zero_point"}}`` (missing keys take the
            section's values; ``act_order`` defaults to ``False``, ``zero_point`` to the section's for an
            asymmetric module and to ``"float"`` for a symmetric one). Written by the readers of community
            checkpoints (GGUF, GPTQ, AWQ, compressed-tensors), whose files mix formats per tensor and use
            widths (5, 6 bits) and group sizes (16) the algorithms here do not produce.
        rotation: rotate the hidden states by random Hadamard matrices before quantizing (QuaRot): ``None``
            (default), ``"hadamard"`` (norms folded into the linears, the residual stream and each head's values
            rotated by folded matrices, and the input of every MLP down projection rotated at run time by a fast
            Walsh-Hadamard transform inside its `QuantLinear`) or ``"hadamard-folded"`` (the folded rotations
            only: the model keeps its plain architecture and exports to every format). The float model computes
            the same function; the rotated weights and activations have no outlier channels. Pre-norm RMSNorm
            families only (Llama, Mistral, Qwen2/3, Phi-3); a tied output head is untied. Runs the calibrated
            pipeline (whole model loaded first) with any method.
        rotation_seed: seed of the random signs of the rotations.
        online_rotation: written by the pipeline: the modules whose input is rotated at run time (their
            `QuantLinear` holds the signs as ``input_rotation``); not set by users.
    """

    section_name: ClassVar[str] = "quantization"
    BITS: ClassVar[tuple[int, ...]] = QUANT_BITS
    CLIPS: ClassVar[tuple[str, ...]] = ("none", "mse")

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    zero_point: str = "float"
    clip: str = "none"
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    scale_dtype: str = "float16"
    modules_to_not_convert: list[str] | None = None
    outliers: float = 0.0
    module_bits: dict[str, int] | None = None
    target_bits: float | None = None
    bits_choices: list[int] = field(default_factory=lambda: sorted(QUANT_BITS))
    options: Any = None
    module_formats: dict[str, dict[str, Any]] | None = None
    rotation: str | None = None
    rotation_seed: int = 0
    online_rotation: list[str] | None = None

    FORMAT_KEYS: ClassVar[tuple[str, ...]] = (
        "bits",
        "group_size",
        "symmetric",
        "scale_dtype",
        "act_order",
        "zero_point",
    )
    ZERO_POINTS: ClassVar[tuple[str, ...]] = ("float", "integer")
    #: written to config.json only for a rotated model (an older version then refuses it by name)
    ROTATION_KEYS: ClassVar[tuple[str, ...]] = ("rotation", "rotation_seed", "online_rotation")
    STORAGE_BITS: ClassVar[tuple[int, ...]] = STORAGE_BITS

    def validate(self) -> None:
        s = self.section_name
        from .quant.methods import METHODS, OptionError

        if not isinstance(self.method, str) or self.method not in METHODS:
            _fail(s, "method", self.method, ", ".join(METHODS))
        method = METHODS[self.method]
        if self.options is None:
            self.options = {}
        if isinstance(self.options, dict):
            unknown = _sorted_keys(set(self.options) - set(method.options.field_names()))
            if unknown:
                raise ValueError(
                    f"unknown key(s) {', '.join(unknown)} in {s}.{self.method}; allowed keys: "
                    f"{', '.join(method.options.field_names()) or 'none'}"
                )
            try:
                self.options = method.options(**self.options)
            except OptionError as e:
                _fail(s, f"{self.method}.{e.field}", e.value, e.allowed)
        elif not isinstance(self.options, method.options):
            _fail(s, self.method, self.options, f"a dict or {method.options.__name__}")
        _check_int_choice(s, "bits", self.bits, self.BITS)
        if self.group_size == -1:
            self.group_size = None
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or not 32 <= self.group_size <= 256
            or self.group_size % 32
        ):
            _fail(s, "group_size", self.group_size, "None (per output channel) or 32, 64, 96, ..., 256")
        if not isinstance(self.symmetric, bool):
            _fail(s, "symmetric", self.symmetric, "True, False")
        if self.symmetric and not method.symmetric_allowed:
            _fail(
                s,
                "symmetric",
                self.symmetric,
                f"False ({self.method} optimizes a zero point, so it is asymmetric only)",
            )
        if self.zero_point not in self.ZERO_POINTS:
            _fail(s, "zero_point", self.zero_point, ", ".join(self.ZERO_POINTS))
        if self.symmetric and self.zero_point == "integer":
            _fail(
                s,
                "zero_point",
                self.zero_point,
                "'float' with symmetric=True (a symmetric grid has the implicit zero point 2**(bits-1); "
                "integer zero points need symmetric=False)",
            )
        if self.clip not in self.CLIPS:
            _fail(s, "clip", self.clip, ", ".join(self.CLIPS))
        if isinstance(self.clip_grid, bool) or not isinstance(self.clip_grid, int) or not 2 <= self.clip_grid <= 200:
            _fail(s, "clip_grid", self.clip_grid, "an integer in [2, 200]")
        if not isinstance(self.clip_max_shrink, (int, float)) or not 0.0 < self.clip_max_shrink < 1.0:
            _fail(s, "clip_max_shrink", self.clip_max_shrink, "a float in (0, 1)")
        if self.scale_dtype not in SCALE_DTYPES:
            _fail(s, "scale_dtype", self.scale_dtype, ", ".join(SCALE_DTYPES))
        if self.modules_to_not_convert is not None:
            if not isinstance(self.modules_to_not_convert, (list, tuple)) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                _fail(s, "modules_to_not_convert", self.modules_to_not_convert, "None or a list of strings")
            _check_patterns(s, "modules_to_not_convert", self.modules_to_not_convert)
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if (
            isinstance(self.outliers, bool)
            or not isinstance(self.outliers, (int, float))
            or not 0 <= self.outliers <= 0.1
        ):
            _fail(s, "outliers", self.outliers, "a fraction in [0, 0.1] (0.01 = 1 %)")
        self.outliers = float(self.outliers)
        if self.outliers and not method.supports_outliers:
            _fail(s, "outliers", self.outliers, f"0 ({self.method} does not keep outliers)")
        if self.module_bits is not None:
            if not isinstance(self.module_bits, dict) or not all(
                isinstance(k, str) and _is_int(v) and v in self.BITS for k, v in self.module_bits.items()
            ):
                _fail(s, "module_bits", self.module_bits, "None or a dict {module pattern: bits, an int in 8, 4, 3, 2}")
            self.module_bits = dict(self.module_bits)
        if (
            not isinstance(self.bits_choices, (list, tuple))
            or not self.bits_choices
            or not all(_is_int(b) and b in self.BITS for b in self.bits_choices)
        ):
            _fail(s, "bits_choices", self.bits_choices, "a non-empty list of ints among 8, 4, 3, 2")
        self.bits_choices = sorted(set(self.bits_choices))
        if self.target_bits is not None and (
            isinstance(self.target_bits, bool)
            or not isinstance(self.target_bits, (int, float))
            or not min(self.bits_choices) <= self.target_bits <= max(self.bits_choices)
        ):
            _fail(
                s,
                "target_bits",
                self.target_bits,
                f"None or a number in [{min(self.bits_choices)}, {max(self.bits_choices)}] (bits_choices)",
            )
        if self.rotation is not None and self.rotation not in ROTATIONS:
            _fail(s, "rotation", self.rotation, "None, " + ", ".join(ROTATIONS))
        if not _is_int(self.rotation_seed) or self.rotation_seed < 0:
            _fail(s, "rotation_seed", self.rotation_seed, "a non-negative integer")
        if self.online_rotation is not None:
            if not isinstance(self.online_rotation, (list, tuple)) or not all(
                isinstance(m, str) for m in self.online_rotation
            ):
                _fail(s, "online_rotation", self.online_rotation, "None or a list of module names")
            if self.rotation != "hadamard":
                _fail(
                    s,
                    "online_rotation",
                    self.online_rotation,
                    "None unless rotation='hadamard' (written by the pipeline)",
                )
            self.online_rotation = list(self.online_rotation)
        if self.module_formats is not None:
            if not isinstance(self.module_formats, dict):
                _fail(s, "module_formats", self.module_formats, "None or a dict {module name: format dict}")
            self.module_formats = {name: self._check_format(name, fmt) for name, fmt in self.module_formats.items()}

    @classmethod
    def from_dict(cls, data: Any) -> "QuantizationSpec":
        """From a dict: the selected method's options nested under its name, or (as written by earlier
        versions) as flat ``<method>_<option>`` keys."""
        if isinstance(data, dict):
            data = cls._nest_options(data)
        return super().from_dict(data)

    @classmethod
    def _nest_options(cls, data: dict[str, Any]) -> dict[str, Any]:
        from .quant.methods import METHODS, OptionError

        s = cls.section_name
        data = dict(data)
        selected = data.get("method", "rtn")
        nested: dict[str, Any] = {}
        for name in METHODS:
            if name in data:
                value = data.pop(name)
                if name != selected:
                    raise ValueError(
                        f"{s}.{name} holds options of method {name!r}, but {s}.method={selected!r}; "
                        f"nest a method's options under its own name"
                    )
                if not isinstance(value, dict):
                    _fail(s, name, value, f"a dict with keys {', '.join(METHODS[name].options.field_names())}")
                nested.update(value)
        for key in list(data):
            if not isinstance(key, str):
                continue  # reported as an unknown key by from_dict
            for name, method in METHODS.items():
                option = key[len(name) + 1 :] if key.startswith(name + "_") else None
                if option not in method.options.field_names():
                    continue
                value = data.pop(key)
                try:
                    method.options(**{option: value})
                except OptionError as e:
                    _fail(s, key, e.value, e.allowed)
                if name == selected:
                    nested.setdefault(option, value)
        if nested:
            if data.get("options") is not None:
                raise ValueError(f"{s}: give the method's options either nested under {selected!r} or as 'options'")
            data["options"] = nested
        return data

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if key == "options" or (key in self.ROTATION_KEYS and self.rotation is None):
                continue  # no rotation: written as before rotations existed (older versions read it)
            out[key] = value
            if key == "method":
                out[self.method] = self.options.to_dict()
        return out

    def with_method(self, method: str, **changes: Any) -> "QuantizationSpec":
        """A copy using ``method`` (with its default options) and the given field changes."""
        data = self.to_dict()
        data.pop(self.method, None)
        return type(self).from_dict({**data, **changes, "method": method})

    def _check_format(self, name: str, fmt: Any) -> dict[str, Any]:
        key = f"module_formats[{name!r}]"
        if not isinstance(name, str) or not isinstance(fmt, dict):
            _fail(self.section_name, key, fmt, "a dict with keys " + ", ".join(self.FORMAT_KEYS))
        unknown = sorted(set(fmt) - set(self.FORMAT_KEYS))
        if unknown:
            _fail(self.section_name, key, fmt, "a dict with keys " + ", ".join(self.FORMAT_KEYS))
        out = {k: fmt.get(k, getattr(self, k, False)) for k in self.FORMAT_KEYS}
        if "zero_point" not in fmt and out["symmetric"] is True:
            out["zero_point"] = "float"
        _check_int_choice(self.section_name, f"{key}.bits", out["bits"], self.STORAGE_BITS)
        g = out["group_size"]
        if g == -1:
            out["group_size"] = g = None
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            _fail(self.section_name, f"{key}.group_size", g, "None or a positive integer")
        for flag in ("symmetric", "act_order"):
            if not isinstance(out[flag], bool):
                _fail(self.section_name, f"{key}.{flag}", out[flag], "True, False")
        if out["scale_dtype"] not in SCALE_DTYPES:
            _fail(self.section_name, f"{key}.scale_dtype", out["scale_dtype"], ", ".join(SCALE_DTYPES))
        if out["zero_point"] not in self.ZERO_POINTS:
            _fail(self.section_name, f"{key}.zero_point", out["zero_point"], ", ".join(self.ZERO_POINTS))
        if out["symmetric"] and out["zero_point"] == "integer":
            _fail(self.section_name, f"{key}.zero_point", out["zero_point"], "'float' with symmetric=True")
        return out

    def format_of(self, name: str) -> dict[str, Any]:
        """Storage format of module ``name``: its ``module_formats`` entry, else the section's own
        (with the ``module_bits`` width)."""
        if self.module_formats and name in self.module_formats:
            return dict(self.module_formats[name])
        from .quant.core.mixed import bits_for_module

        return {
            "bits": bits_for_module(name, self),
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
            "act_order": False,
            "zero_point": self.zero_point,
        }

    @property
    def needs_calibration(self) -> bool:
        """True when this spec cannot be applied one tensor at a time without data."""
        from .quant.methods import METHODS

        return METHODS[self.method].calibrated or self.target_bits is not None or self.rotation is not None


@dataclass
class CalibrationSpec(Section):
    """Calibration data for ``awq``, ``gptq``, automatic mixed precision, outlier selection and
    static activation scales.

    Args:
        dataset: ``"kjv"`` (the bundled corpus's calibration slice, disjoint from the evaluation
            slice), a path to a UTF-8 text file, ``"datasets:NAME[:CONFIG]:SPLIT"``, or a list of
            strings. The text is tokenized once and cut into ``samples`` windows.
        samples: number of windows of ``sequence_length`` tokens.
        sequence_length: tokens per window.
        batch_size: windows per forward pass during capture.
        tokenizer: tokenizer name or path; ``None`` uses the model's own folder / Hub id.
        device: where each decoder layer runs during calibration (``None``: where the model
            is). With ``"cuda"`` only one layer at a time is moved to the GPU.
    """

    section_name: ClassVar[str] = "calibration"

    dataset: str | list[str] = "kjv"
    samples: int = 32
    sequence_length: int = 512
    batch_size: int = 4
    tokenizer: str | None = None
    device: str | None = None

    def validate(self) -> None:
        s = self.section_name
        if isinstance(self.dataset, (list, tuple)):
            if not all(isinstance(t, str) for t in self.dataset):
                _fail(
                    s,
                    "dataset",
                    self.dataset,
                    "'kjv', a file path, 'datasets:NAME[:CONFIG]:SPLIT' or a list of strings",
                )
            if not any(t.strip() for t in self.dataset):
                raise ValueError("calibration.dataset is empty: give at least one non-empty text")
            self.dataset = list(self.dataset)
        elif not isinstance(self.dataset, str) or not self.dataset.strip():
            _fail(s, "dataset", self.dataset, "'kjv', a file path, 'datasets:NAME[:CONFIG]:SPLIT' or a list of strings")
        for key, low, high in (("samples", 1, 100_000), ("sequence_length", 2, 1_000_000), ("batch_size", 1, 4096)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                _fail(s, key, value, f"an integer in [{low}, {high}]")
        for key in ("tokenizer", "device"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                _fail(s, key, value, "None or a string")


@dataclass
class ActivationSpec(Section):
    """Int8 activation quantization of the quantized linears (W8A8, with 8-bit weights).

    Args:
        mode: ``"dynamic"`` (a scale per token computed at run time) or ``"static"`` (one scale
            per linear input, from calibration data, clipped at ``percentile``).
        percentile: percentile of ``|x|`` over the calibration tokens that maps to 127
            (static mode).
        smoothquant: SmoothQuant migration strength ``alpha`` in (0, 1), or ``None``. Moves
            activation outliers into the weights with per-channel scales folded into the
            preceding norm/linear (needs calibration data).
    """

    section_name: ClassVar[str] = "activations"
    MODES: ClassVar[tuple[str, ...]] = ("dynamic", "static")

    bits: int = 8
    mode: str = "dynamic"
    percentile: float = 99.99
    smoothquant: float | None = None

    def validate(self) -> None:
        s = self.section_name
        _check_int_choice(s, "bits", self.bits, (8,))
        if self.mode not in self.MODES:
            _fail(s, "mode", self.mode, ", ".join(self.MODES))
        if (
            isinstance(self.percentile, bool)
            or not isinstance(self.percentile, (int, float))
            or not 50 < self.percentile <= 100
        ):
            _fail(s, "percentile", self.percentile, "a number in (50, 100]")
        if self.smoothquant is not None and (
            isinstance(self.smoothquant, bool)
            or not isinstance(self.smoothquant, (int, float))
            or not 0 < self.smoothquant < 1
        ):
            _fail(s, "smoothquant", self.smoothquant, "None or a float in (0, 1)")

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static" or self.smoothquant is not None


#: Draft names that build a draft from the target's own weights (see `SpeculativeSpec.draft`).
DRAFT_SCHEME_PATTERN = re.compile(r"^(?:(rtn|hqq)-)?int(8|4|3|2)(?:-g(\d+))?$")
DRAFT_DTYPES = ("bfloat16", "float16")
EARLY_EXIT_PATTERN = re.compile(r"^early-exit:(\d+)$")


@dataclass
class SpeculativeSpec(Section):
    """Speculative decoding used by ``model.generate`` (a draft proposes, the target verifies).

    Args:
        draft: where the draft comes from.

            * ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"``, optionally ``"hqq-int4"`` and a group
              size ``"int4-g32"``: a weight-quantized copy of the target built from its own weights
              (round-to-nearest or HQQ; one symmetric scale per channel for int8, groups of 32 for
              the lower widths unless ``-gN`` says otherwise; the head stays in float). Embeddings and
              norms are shared with the target.
            * ``"bfloat16"`` / ``"float16"``: a half-precision copy of the target.
            * ``"early-exit:K"``: the target's first ``K`` decoder layers, its final norm and its
              head (no extra weights).
            * ``"ngram"``: prompt lookup; the continuation of the latest earlier occurrence of the
              last ``ngram_size`` (down to 1) tokens. No model at all.
            * anything else: a path or Hub id of a smaller model sharing the target's tokenizer.
        num_draft_tokens: tokens drafted per target forward pass (the starting value when
            ``schedule="adaptive"``).
        schedule: ``"adaptive"`` picks the draft length each step from the running acceptance
            rate and the measured draft/target cost, within ``[1, max_draft_tokens]``;
            ``"constant"`` always drafts ``num_draft_tokens`` (seeded sampling is then reproducible
            run to run, since the draft length does not depend on timings).
        max_draft_tokens: upper bound of the adaptive draft length.
        ngram_size: longest n-gram matched by the ``"ngram"`` draft.
    """

    section_name: ClassVar[str] = "speculative"
    SCHEDULES: ClassVar[tuple[str, ...]] = ("adaptive", "constant")

    draft: str = "int4"
    num_draft_tokens: int = 4
    schedule: str = "adaptive"
    max_draft_tokens: int = 8
    ngram_size: int = 3

    def validate(self) -> None:
        s = self.section_name
        if not isinstance(self.draft, str) or not self.draft.strip():
            _fail(
                s,
                "draft",
                self.draft,
                "'int8', 'int4', 'int3', 'int2' (optionally 'hqq-' and '-gN'), "
                "'bfloat16', 'float16', 'early-exit:K', 'ngram', or a model path / Hub id",
            )
        if self.draft.startswith("early-exit"):
            m = EARLY_EXIT_PATTERN.match(self.draft)
            if m is None or len(m.group(1)) > 9 or int(m.group(1)) < 1:
                _fail(s, "draft", self.draft, "'early-exit:K' with K >= 1 decoder layers")
        m = DRAFT_SCHEME_PATTERN.match(self.draft)
        if m is not None and m.group(3) is not None and (len(m.group(3)) > 9 or not 16 <= int(m.group(3)) <= 4096):
            _fail(s, "draft", self.draft, "a group size in [16, 4096] after '-g'")
        if self.schedule not in self.SCHEDULES:
            _fail(s, "schedule", self.schedule, ", ".join(self.SCHEDULES))
        for key, low in (("num_draft_tokens", 1), ("max_draft_tokens", 1), ("ngram_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 128:
                _fail(s, key, value, f"an integer in [{low}, 128]")
        if self.max_draft_tokens < self.num_draft_tokens:
            _fail(
                s,
                "max_draft_tokens",
                self.max_draft_tokens,
                f"an integer >= num_draft_tokens ({self.num_draft_tokens})",
            )


#: Issue 6 names it SpeculativeConfig; both names are the same section class.
SpeculativeConfig = SpeculativeSpec


@dataclass
class AttentionSpec(Section):
    """Attention implementation and KV cache chosen for the model (saved with it).

    Args:
        implementation: the ``attn_implementation`` the model is built with when ``from_pretrained`` is
            not given one (``"hf_efficiency_blockwise"``, ``"sdpa"``, ``"eager"``, ...); ``None`` keeps
            transformers' default.
        kv_cache_bits: store keys and values as 8-, 4- or 2-bit codes (`QuantizedKVCache`) in every
            ``generate()`` that is not given a cache; ``None`` keeps transformers' cache.
        kv_group_size: channels per scale and minimum in the quantized cache.
        kv_residual_length: most recent tokens also kept in float by the quantized cache.
        lowrank_landmarks: pooled rows standing for the distant past in ``hf_efficiency_lowrank``.
        lowrank_window: recent positions ``hf_efficiency_lowrank`` attends to exactly.
        lowrank_sinks: first positions ``hf_efficiency_lowrank`` always attends to exactly.
    """

    section_name: ClassVar[str] = "attention"

    implementation: str | None = None
    kv_cache_bits: int | None = None
    kv_group_size: int = 64
    kv_residual_length: int = 0
    lowrank_landmarks: int = 64
    lowrank_window: int = 256
    lowrank_sinks: int = 4

    def validate(self) -> None:
        s = self.section_name
        if self.implementation is not None and (
            not isinstance(self.implementation, str)
            or "flash" in self.implementation
            and self.implementation.startswith("hf_efficiency")
        ):
            _fail(
                s,
                "implementation",
                self.implementation,
                "None or an attn_implementation name such as "
                "'hf_efficiency_blockwise', 'sdpa' or 'eager' (transformers takes any name containing 'flash' "
                "for a flash-attn kernel, so hf-efficiency's exact block-wise attention is 'hf_efficiency_blockwise')",
            )
        if self.kv_cache_bits is not None and (not _is_int(self.kv_cache_bits) or self.kv_cache_bits not in KV_BITS):
            _fail(s, "kv_cache_bits", self.kv_cache_bits, "None, 8, 4 or 2 (an int)")
        for key, low in (
            ("kv_group_size", 1),
            ("kv_residual_length", 0),
            ("lowrank_landmarks", 1),
            ("lowrank_window", 0),
            ("lowrank_sinks", 0),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _fail(s, key, value, f"an integer >= {low}")


@dataclass
class PeftSpec(Section):
    """Parameter-efficient fine-tuning methods peft lacks (applied by `hf_efficiency.peft.methods.apply_peft`).

    Args:
        method: ``"bitfit"`` (train only bias terms), ``"freeze"`` (freeze the input embedding and the
            lower ``freeze_layers`` decoder layers, train the rest) or ``"adapters"`` (bottleneck
            adapters; only they train). Required.
        freeze_layers: decoder layers frozen from the bottom by ``"freeze"`` (0 .. number of layers).
        bitfit_targets: module-name patterns whose biases ``"bitfit"`` trains (a full name, a
            ``.``-suffix such as ``"v_proj"``, or a regex matching the whole name). ``None``: every
            linear and every bias inside the decoder layers (the head and embeddings excluded).
        bitfit_add_missing: give target linears without a bias (Llama's) a zero-initialized one.
        adapter_size: bottleneck width of each adapter.
        adapter_placement: ``"pfeiffer"`` (one adapter on the MLP output of every layer) or
            ``"houlsby"`` (one on the attention output and one on the MLP output).
        adapter_nonlinearity: ``"relu"``, ``"gelu"`` or ``"silu"`` between the projections.
        adapter_init_scale: standard deviation of the down-projection's normal initialization (the
            up-projection and both biases start at zero, so a new adapter is the identity).
        trainable_modules: module-name patterns (as ``bitfit_targets``) whose floating-point parameters
            also train, e.g. ``["norm"]`` for the norms (peft's ``modules_to_save``); ``None``: none.
    """

    section_name: ClassVar[str] = "peft"
    METHODS: ClassVar[tuple[str, ...]] = ("bitfit", "freeze", "adapters")
    PLACEMENTS: ClassVar[tuple[str, ...]] = ("pfeiffer", "houlsby")
    NONLINEARITIES: ClassVar[tuple[str, ...]] = ("relu", "gelu", "silu")

    method: str | None = None
    freeze_layers: int = 0
    bitfit_targets: list[str] | None = None
    bitfit_add_missing: bool = True
    adapter_size: int = 64
    adapter_placement: str = "pfeiffer"
    adapter_nonlinearity: str = "relu"
    adapter_init_scale: float = 0.01
    trainable_modules: list[str] | None = None

    def validate(self) -> None:
        s = self.section_name
        if self.method not in self.METHODS:
            _fail(s, "method", self.method, ", ".join(self.METHODS))
        for key, low in (("freeze_layers", 0), ("adapter_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _fail(s, key, value, f"an integer >= {low}")
        if not isinstance(self.bitfit_add_missing, bool):
            _fail(s, "bitfit_add_missing", self.bitfit_add_missing, "True, False")
        if self.adapter_placement not in self.PLACEMENTS:
            _fail(s, "adapter_placement", self.adapter_placement, ", ".join(self.PLACEMENTS))
        if self.adapter_nonlinearity not in self.NONLINEARITIES:
            _fail(s, "adapter_nonlinearity", self.adapter_nonlinearity, ", ".join(self.NONLINEARITIES))
        if (
            isinstance(self.adapter_init_scale, bool)
            or not isinstance(self.adapter_init_scale, (int, float))
            or not 0 < self.adapter_init_scale <= 1
        ):
            _fail(s, "adapter_init_scale", self.adapter_init_scale, "a number in (0, 1]")
        self.adapter_init_scale = float(self.adapter_init_scale)
        for key in ("bitfit_targets", "trainable_modules"):
            value = getattr(self, key)
            if value is None:
                continue
            if (
                isinstance(value, str)
                or not isinstance(value, (list, tuple))
                or not value
                or not all(isinstance(p, str) and p for p in value)
            ):
                _fail(s, key, value, "None or a non-empty list of module-name patterns")
            for pattern in value:
                try:
                    re.compile(pattern)
                except (re.error, RecursionError, OverflowError) as exc:
                    _fail(s, key, value, f"valid patterns ({pattern!r} is not a regex: {exc})")
            setattr(self, key, list(value))


#: section name -> Section class. Later features register theirs with `register_section`.
SECTIONS: dict[str, type[Section]] = {
    "quantization": QuantizationSpec,
    "calibration": CalibrationSpec,
    "activations": ActivationSpec,
    "speculative": SpeculativeSpec,
    "attention": AttentionSpec,
    "peft": PeftSpec,
}


def register_section(cls: type[Section]) -> type[Section]:
    """Add a section class to `EfficiencyConfig` (usable as a decorator)."""
    SECTIONS[cls.section_name] = cls
    return cls


class EfficiencyConfig(QuantizationConfigMixin):
    """Configuration of every efficiency method applied to a model.

    Pass it as ``efficiency_config=`` (or ``quantization_config=``) to ``from_pretrained``::

        cfg = EfficiencyConfig(quantization={"method": "rtn", "bits": 4, "group_size": 128})
        model = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)

    Sections are given as dicts or section dataclasses; unknown sections, unknown keys and bad
    values raise ``ValueError``. ``format_version`` records the on-disk format; a checkpoint
    written by a newer hf-efficiency is refused with an upgrade hint.
    """

    _LOAD_ONLY = ("dequantize", "keep_compressed")

    def __init__(
        self,
        quant_method: str = QUANT_METHOD,
        format_version: int = FORMAT_VERSION,
        dequantize: bool = False,
        base_model: str | None = None,
        keep_compressed: bool = False,
        **sections: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r:.100} is not allowed; allowed values: {QUANT_METHOD!r}")
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ValueError(f"format_version={format_version!r:.100} is not allowed; allowed values: integers >= 1")
        if format_version > FORMAT_VERSION:
            from . import __version__

            raise ValueError(
                f"this checkpoint uses hf-efficiency format version {format_version}, but the installed "
                f"hf-efficiency {__version__} reads format versions up to {FORMAT_VERSION}; "
                "upgrade with `pip install -U hf-efficiency`"
            )
        unknown = _sorted_keys(set(sections) - set(SECTIONS))
        if unknown:
            raise ValueError(
                f"unknown EfficiencyConfig section(s) {', '.join(unknown)}; "
                f"allowed sections: {', '.join(sorted(SECTIONS))}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        if dequantize is not None and not isinstance(dequantize, bool):
            raise ValueError(f"dequantize={dequantize!r:.100} is not allowed; allowed values: True, False")
        self.dequantize = bool(dequantize)
        if not isinstance(keep_compressed, bool):
            raise ValueError(f"keep_compressed={keep_compressed!r:.100} is not allowed; allowed values: True, False")
        #: load-only: read a community compressed checkpoint (GGUF ``gguf_file=``, or a GPTQ / AWQ /
        #: compressed-tensors folder) into our quantized modules, keeping its bits (see ``hf_efficiency.formats``)
        self.keep_compressed = keep_compressed
        if base_model is not None and not isinstance(base_model, str):
            raise ValueError(
                f"base_model={base_model!r:.100} is not allowed; allowed values: None or a model id string"
            )
        self.base_model = base_model
        for name, cls in SECTIONS.items():
            value = sections.get(name)
            setattr(self, name, None if value is None else cls.from_dict(value))
        self._validate_sections()

    def _validate_sections(self) -> None:
        """Rules that span sections."""
        q, act = self.quantization, getattr(self, "activations", None)
        if act is not None:
            if q is None or q.bits != 8 or q.group_size is not None or not q.symmetric:
                raise ValueError(
                    "activations (W8A8) needs quantization={'bits': 8, 'group_size': None, 'symmetric': True}; "
                    f"got {None if q is None else {'bits': q.bits, 'group_size': q.group_size, 'symmetric': q.symmetric}}"
                )
            from .quant.methods import METHODS

            w8a8 = [name for name, m in METHODS.items() if m.supports_int8_activations]
            if q.method not in w8a8 or q.outliers or q.module_bits or q.target_bits is not None:
                raise ValueError(
                    f"activations (W8A8) supports quantization.method {' or '.join(map(repr, w8a8))} without outliers or mixed "
                    f"precision; got method={q.method!r}, outliers={q.outliers}, module_bits={q.module_bits}, "
                    f"target_bits={q.target_bits}"
                )
        if self.needs_calibration and getattr(self, "calibration", None) is None:
            # Made explicit (and saved in config.json) rather than applied silently.
            self.calibration = CalibrationSpec()

    # --- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": self.quant_method, "format_version": self.format_version}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        for name in SECTIONS:
            section = getattr(self, name, None)
            if section is not None:
                out[name] = section.to_dict()
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EfficiencyConfig) and self.to_dict() == other.to_dict()

    def get_loading_attributes(self) -> dict[str, Any]:
        """Attributes a user may pass when loading an already-quantized checkpoint."""
        return {"dequantize": self.dequantize}

    # --- helpers ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: Any, return_unused_kwargs: bool = False, **kwargs: Any):
        """From the dict form (``config.json["quantization_config"]``); a value that is not a dict with string
        keys is a ``ValueError``. Keyword arguments override the dict's entries."""
        _check_top_level(config_dict)
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def coerce(cls, value: "EfficiencyConfig | dict[str, Any]") -> "EfficiencyConfig":
        """Accept an `EfficiencyConfig` or its dict form; anything else is a `TypeError`."""
        if isinstance(value, EfficiencyConfig):
            return value
        if isinstance(value, dict):
            _check_top_level(value)
            return cls(**value)
        raise TypeError(f"efficiency_config must be an EfficiencyConfig or a dict, got {type(value).__name__}")

    @property
    def quantizes_weights(self) -> bool:
        return self.quantization is not None

    @property
    def needs_calibration(self) -> bool:
        """True when applying this config runs the calibrated, layer-by-layer pipeline."""
        q, act = self.quantization, getattr(self, "activations", None)
        if q is None:
            return False
        return (
            q.needs_calibration
            or (act is not None and act.needs_calibration)
            or (q.outliers > 0 and getattr(self, "calibration", None) is not None)
        )


def _check_top_level(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"an EfficiencyConfig dict must be a dict, got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ValueError(f"EfficiencyConfig keys must be strings; got {_sorted_keys(bad)[0]}")


def saved_section(model: Any, name: str) -> Section | None:
    """Section ``name`` of the `EfficiencyConfig` a model (or module holding a ``config``) carries in
    ``config.quantization_config`` (as the object or as its dict), or ``None``."""
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(cfg, dict) and cfg.get("quant_method") == QUANT_METHOD:
        cfg = EfficiencyConfig(**cfg)
    return getattr(cfg, name, None) if isinstance(cfg, EfficiencyConfig) else None
