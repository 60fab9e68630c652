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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "hf_efficiency"
#: Version of the on-disk format written by this installation. Bumped on incompatible changes.
FORMAT_VERSION = 1

_SCALE_DTYPES = ("float16", "bfloat16", "float32")


def _fail(section: str, key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{section}.{key}={value!r} is not allowed; allowed values: {allowed}")


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
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in section {cls.section_name!r}; "
                f"allowed keys: {', '.join(names)}"
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
        method: the algorithm; ``"rtn"`` (round-to-nearest, optionally with a clip search).
        bits: integer width of stored weights: 8, 4, 3 or 2.
        group_size: weights per scale along the input dimension (32-256), or ``None`` for one
            scale per output channel.
        symmetric: absmax scaling with an implicit zero point (``True``) or a scale and a
            stored minimum per group (``False``).
        clip: ``"none"`` (use the full range; default) or ``"mse"`` (search a shrink ratio of the
            range per group that minimizes the squared weight reconstruction error). On SmolLM2 the
            weight-MSE search lowers weight error but raises perplexity (it clips the large weights
            that matter most); see README "Clipping".
        clip_grid: number of shrink ratios tried by the clip search.
        clip_max_shrink: the smallest ratio tried is ``1 - clip_max_shrink``.
        scale_dtype: storage dtype of scales and minima.
        modules_to_not_convert: module names or patterns kept in float (prefix, suffix or regex
            match, as in transformers). ``None`` keeps the output embedding (``lm_head``); an
            explicit list replaces that default. Embeddings are never quantized.
    """

    section_name: ClassVar[str] = "quantization"
    METHODS: ClassVar[tuple[str, ...]] = ("rtn",)
    BITS: ClassVar[tuple[int, ...]] = (8, 4, 3, 2)
    CLIPS: ClassVar[tuple[str, ...]] = ("none", "mse")

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    clip: str = "none"
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    scale_dtype: str = "float16"
    modules_to_not_convert: list[str] | None = None

    def validate(self) -> None:
        s = self.section_name
        if self.method not in self.METHODS:
            _fail(s, "method", self.method, ", ".join(self.METHODS))
        if isinstance(self.bits, bool) or self.bits not in self.BITS:
            _fail(s, "bits", self.bits, ", ".join(map(str, self.BITS)))
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
        if self.clip not in self.CLIPS:
            _fail(s, "clip", self.clip, ", ".join(self.CLIPS))
        if isinstance(self.clip_grid, bool) or not isinstance(self.clip_grid, int) or not 2 <= self.clip_grid <= 200:
            _fail(s, "clip_grid", self.clip_grid, "an integer in [2, 200]")
        if not isinstance(self.clip_max_shrink, (int, float)) or not 0.0 < self.clip_max_shrink < 1.0:
            _fail(s, "clip_max_shrink", self.clip_max_shrink, "a float in (0, 1)")
        if self.scale_dtype not in _SCALE_DTYPES:
            _fail(s, "scale_dtype", self.scale_dtype, ", ".join(_SCALE_DTYPES))
        if self.modules_to_not_convert is not None:
            if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                _fail(s, "modules_to_not_convert", self.modules_to_not_convert, "None or a list of strings")
            self.modules_to_not_convert = list(self.modules_to_not_convert)


#: section name -> Section class. Later features register theirs with `register_section`.
SECTIONS: dict[str, type[Section]] = {"quantization": QuantizationSpec}


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

    _LOAD_ONLY = ("dequantize",)

    def __init__(
        self,
        quant_method: str = QUANT_METHOD,
        format_version: int = FORMAT_VERSION,
        dequantize: bool = False,
        base_model: str | None = None,
        **sections: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r} is not allowed; allowed values: {QUANT_METHOD!r}")
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ValueError(f"format_version={format_version!r} is not allowed; allowed values: integers >= 1")
        if format_version > FORMAT_VERSION:
            from . import __version__

            raise ValueError(
                f"this checkpoint uses hf-efficiency format version {format_version}, but the installed "
                f"hf-efficiency {__version__} reads format versions up to {FORMAT_VERSION}; "
                "upgrade with `pip install -U hf-efficiency`"
            )
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ValueError(
                f"unknown EfficiencyConfig section(s) {', '.join(map(repr, unknown))}; "
                f"allowed sections: {', '.join(sorted(SECTIONS))}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.dequantize = bool(dequantize)
        if base_model is not None and not isinstance(base_model, str):
            raise ValueError(f"base_model={base_model!r} is not allowed; allowed values: None or a model id string")
        self.base_model = base_model
        for name, cls in SECTIONS.items():
            value = sections.get(name)
            setattr(self, name, None if value is None else cls.from_dict(value))

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
    def coerce(cls, value: "EfficiencyConfig | dict[str, Any]") -> "EfficiencyConfig":
        """Accept an `EfficiencyConfig` or its dict form; anything else is a `TypeError`."""
        if isinstance(value, EfficiencyConfig):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"efficiency_config must be an EfficiencyConfig or a dict, got {type(value).__name__}")

    @property
    def quantizes_weights(self) -> bool:
        return self.quantization is not None
