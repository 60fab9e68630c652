"""`MemoryScenario`: what runs (inference or a training step) and how, for `estimate_memory` and
`measure_memory` alike; and the standard comparison (fp32 / bf16 / int8 / int4 inference and full
fine-tuning / LoRA / QLoRA training of one model) as `estimate_memory` breakdowns.

A scenario is validated when it is built (``ValueError`` naming the field and its allowed values),
round-trips through `MemoryScenario.to_dict` / `MemoryScenario.from_dict`, and parses from a command
line with ``transformers.HfArgumentParser`` (``--training`` takes a method name,
``--efficiency_config`` JSON text).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .activations import ATTENTION_IMPLEMENTATIONS
from .training import TrainingSetup

if TYPE_CHECKING:
    from ..config import EfficiencyConfig
    from .estimator import MemoryBreakdown
    from .parallel import ParallelPlan

#: Memory the runtime holds before the first tensor: the CUDA context, cuBLAS/cuDNN workspaces
#: and loaded kernels on GPU (the talk's 1 GB; ``torch.cuda.max_memory_allocated`` does not see
#: it, ``nvidia-smi`` does); on CPU the resident size of Python + torch + transformers after
#: import and a first forward (measured: 398 MiB, torch 2.13 CPU, Linux x86-64).
DEVICE_OVERHEAD_BYTES: dict[str, int] = {"cuda": 1_000_000_000, "cpu": 400 * 2**20}
MODES = ("inference", "training")
#: ``adamw`` is ``torch.optim.AdamW(fused=True)``, the Trainer's default ``adamw_torch_fused``;
#: ``adamw_foreach`` is the multi-tensor variant plain ``torch.optim.AdamW`` picks on CUDA;
#: ``adam`` is ``torch.optim.Adam`` with torch's defaults (foreach on CUDA, a loop on CPU).
OPTIMIZERS = ("adamw", "adamw_foreach", "adam", "adamw_8bit", "sgd", "adafactor")
MIXED_PRECISION = (None, "bf16", "fp16")
KV_CACHE_BITS = (None, 8, 4, 2)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def dataclass_from_dict(cls: type, data: Any, what: str) -> Any:
    """``cls(**data)`` after checking that ``data`` is a dict of ``cls``'s fields (``ValueError`` naming ``what``,
    the unknown keys and the allowed ones)."""
    if not isinstance(data, dict):
        raise ValueError(f"a {what} must be a dict or {cls.__name__}, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(names)}")
    return cls(**data)


def resolve_dtype(dtype: Any, config=None) -> torch.dtype:
    """The torch dtype a scenario's ``dtype`` names (``"auto"``: the config's own dtype, else float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not allowed; allowed values: float32, float16, bfloat16")
        return dtype
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return resolve_dtype(found if found is not None else "float32")
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not allowed; allowed values: auto, {', '.join(DTYPES)}")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed; allowed values: {allowed}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, value, f"integers >= {minimum}")


def _choices(values: tuple[Any, ...]) -> str:
    return ", ".join(map(str, values))


@dataclass
class MemoryScenario:
    """One inference or training scenario, as `estimate_memory` predicts it and `measure_memory` runs it.

    Inference is one forward over ``batch_size x sequence_length`` tokens with the KV cache (all
    logits, as ``model(...)`` returns them), or, with ``new_tokens > 0``, ``generate`` of that many
    tokens. Training is one step of ``optimizer`` on ``batch_size`` sequences of ``sequence_length``
    tokens with the method in ``training``. ``kv_cache_bits``, ``kv_group_size`` and
    ``overhead_bytes`` only change the estimate (`measure_memory` refuses a quantized KV cache and
    never counts the runtime overhead). ``parallel`` makes the estimate per device of a multi-device
    run (`parallel.ParallelPlan`; `measure_memory_parallel` runs it); `measure_memory` refuses it.

    ``training`` accepts a `TrainingSetup`, a method name, a dict of its fields, its JSON text or a
    peft ``LoraConfig``, and holds a `TrainingSetup` afterwards; ``efficiency_config`` accepts an
    ``EfficiencyConfig``, its dict or its JSON text (or ``None``), and holds the validated dict;
    ``parallel`` likewise accepts a `parallel.ParallelPlan`, its dict or JSON text and holds the dict.
    ``dtype`` accepts a torch dtype too and holds its name.
    """

    mode: str = field(default="inference", metadata={"help": "inference or training", "choices": MODES})
    dtype: str = field(
        default="float32",
        metadata={"help": "weight dtype: float32, bfloat16, float16 (or fp32, bf16, fp16) or auto (the config's)"},
    )
    batch_size: int = field(default=1, metadata={"help": "sequences per forward / training step"})
    sequence_length: int = field(default=512, metadata={"help": "tokens per sequence (the prompt, for inference)"})
    new_tokens: int = field(
        default=0, metadata={"help": "inference: generate this many tokens (default: one forward over the prompt)"}
    )
    training: str | TrainingSetup | dict[str, Any] = field(
        default="full",
        metadata={"help": "what trains in training mode: full, lora, qlora, bitfit, adapters or freeze"},
    )
    optimizer: str = field(default="adamw", metadata={"help": "training optimizer", "choices": OPTIMIZERS})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "training autocast: bf16 or fp16 (default: none)", "choices": ("bf16", "fp16")}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "training: recompute layers in backward"})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention kernel", "choices": ATTENTION_IMPLEMENTATIONS}
    )
    efficiency_config: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "EfficiencyConfig (JSON text) applied to the weights, e.g. a quantization section"},
    )
    kv_cache_bits: int | None = field(
        default=None,
        metadata={"help": "estimate: quantized KV cache width (default: the compute dtype)", "choices": (8, 4, 2)},
    )
    kv_group_size: int = field(default=64, metadata={"help": "estimate: values per KV cache scale and zero"})
    device: str = field(
        default="cuda",
        metadata={"help": "target device: cuda or cpu (others need overhead_bytes); picks overhead and kernels"},
    )
    overhead_bytes: int | None = field(
        default=None, metadata={"help": "estimate: override the device's runtime overhead (DEVICE_OVERHEAD_BYTES)"}
    )
    parallel: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "estimate per device: ParallelPlan (JSON text), e.g. "
            '{"devices": 8, "strategy": "zero3", "tp": 1} (default: one device)'
        },
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            _fail("mode", self.mode, _choices(MODES))
        if isinstance(self.dtype, torch.dtype):
            resolve_dtype(self.dtype)
            self.dtype = str(self.dtype).replace("torch.", "")
        elif self.dtype != "auto":
            resolve_dtype(self.dtype)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("sequence_length", self.sequence_length, 1)
        _check_int("new_tokens", self.new_tokens, 0)
        if isinstance(self.training, str) and self.training.lstrip().startswith("{"):
            self.training = _json("training", self.training)
        self.training = TrainingSetup.coerce(self.training)
        if self.optimizer not in OPTIMIZERS:
            _fail("optimizer", self.optimizer, _choices(OPTIMIZERS))
        if self.mixed_precision not in MIXED_PRECISION:
            _fail("mixed_precision", self.mixed_precision, _choices(MIXED_PRECISION))
        if not isinstance(self.gradient_checkpointing, bool):
            _fail("gradient_checkpointing", self.gradient_checkpointing, "True, False")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            _fail("attn_implementation", self.attn_implementation, _choices(ATTENTION_IMPLEMENTATIONS))
        self.efficiency_config = self._check_efficiency_config(self.efficiency_config)
        if isinstance(self.kv_cache_bits, bool) or self.kv_cache_bits not in KV_CACHE_BITS:
            _fail("kv_cache_bits", self.kv_cache_bits, _choices(KV_CACHE_BITS))
        _check_int("kv_group_size", self.kv_group_size, 1)
        if self.overhead_bytes is not None:
            _check_int("overhead_bytes", self.overhead_bytes, 0)
        if not isinstance(self.device, str) or (
            self.device_type not in DEVICE_OVERHEAD_BYTES and self.overhead_bytes is None
        ):
            raise ValueError(
                f"device={self.device!r} has no documented overhead; allowed values: "
                f"{_choices(tuple(DEVICE_OVERHEAD_BYTES))} (or pass overhead_bytes)"
            )
        self.parallel = self._check_parallel(self.parallel)
        if self.mode == "training":
            quantized = self.efficiency_config is not None and self.efficiency_config.get("quantization") is not None
            if self.training.method == "qlora" and not quantized:
                raise ValueError(
                    "training='qlora' needs a quantized base: pass efficiency_config with a quantization section"
                )
            if quantized and self.training.method in ("full", "freeze"):
                raise ValueError(
                    f"training={self.training.method!r} updates quantized weights, which have no gradients; "
                    "use 'qlora' (LoRA on the quantized base) or drop the quantization"
                )

    @staticmethod
    def _check_efficiency_config(value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = _json("efficiency_config", value)
        from ..config import EfficiencyConfig

        return EfficiencyConfig.coerce(value).to_dict()

    @staticmethod
    def _check_parallel(value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = _json("parallel", value)
        from .parallel import ParallelPlan

        return ParallelPlan.coerce(value).to_dict()

    # --- derived --------------------------------------------------------------------------
    @property
    def device_type(self) -> str:
        """``cuda`` for ``cuda:1``: what picks the overhead, the kernels and the allocator rules."""
        return self.device.split(":", 1)[0]

    @property
    def efficiency(self) -> EfficiencyConfig | None:
        """``efficiency_config`` as an ``EfficiencyConfig`` (a new object on every access)."""
        if self.efficiency_config is None:
            return None
        from ..config import EfficiencyConfig

        return EfficiencyConfig.coerce(self.efficiency_config)

    @property
    def parallel_plan(self) -> ParallelPlan | None:
        """``parallel`` as a `parallel.ParallelPlan` (``None``: one device)."""
        if self.parallel is None:
            return None
        from .parallel import ParallelPlan

        return ParallelPlan.from_dict(self.parallel)

    @property
    def training_setup(self) -> TrainingSetup | None:
        """What trains, or ``None`` for inference."""
        return self.training if self.mode == "training" else None

    # --- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; `from_dict` rebuilds an equal scenario."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["training"] = dataclasses.asdict(self.training)
        if isinstance(out["training"]["lora_targets"], tuple):
            out["training"]["lora_targets"] = list(out["training"]["lora_targets"])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryScenario:
        return dataclass_from_dict(cls, data, "memory scenario")

    @classmethod
    def build(cls, scenario: MemoryScenario | dict[str, Any] | str | None = None, **fields: Any) -> MemoryScenario:
        """The scenario `estimate_memory` and `measure_memory` run: ``scenario`` (a `MemoryScenario`, its
        dict, or a mode name as their second positional argument used to be) with ``fields`` replacing
        its values."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"scenario fields: {', '.join(sorted(names))}"
            )
        if isinstance(scenario, str):
            if "mode" in fields:
                raise TypeError(f"mode given twice: {scenario!r} (positional) and mode={fields['mode']!r}")
            return cls(mode=scenario, **fields)
        if isinstance(scenario, cls):
            return dataclasses.replace(scenario, **fields) if fields else scenario
        if isinstance(scenario, dict):
            return cls.from_dict({**scenario, **fields})
        if scenario is None:
            return cls(**fields)
        raise TypeError(f"scenario must be a MemoryScenario, a dict or a mode name; got {type(scenario).__name__}")


def _json(name: str, text: str) -> Any:
    """JSON text, or the contents of a ``.json`` file named by ``text``."""
    try:
        if not text.lstrip().startswith("{") and os.path.isfile(text):
            with open(text, encoding="utf-8") as fh:
                return json.load(fh)
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}={text!r} is not allowed; allowed values: a dict, its JSON text or a .json file ({e})")


# --- the standard comparison ----------------------------------------------------------------
INT8 = {"quantization": {"bits": 8, "group_size": None, "symmetric": True}}
INT4 = {"quantization": {"bits": 4, "group_size": 128}}

#: label -> the scenario fields that define it (batch, sequence, device, ... come from the caller)
STANDARD_SCENARIOS: dict[str, dict[str, Any]] = {
    "fp32 inference": dict(mode="inference", dtype="float32"),
    "bf16 inference": dict(mode="inference", dtype="bfloat16"),
    "int8 inference": dict(mode="inference", dtype="bfloat16", efficiency_config=INT8),
    "int4 inference": dict(mode="inference", dtype="bfloat16", efficiency_config=INT4),
    "full fine-tuning": dict(mode="training", dtype="bfloat16", mixed_precision="bf16", training="full"),
    "LoRA r=8": dict(mode="training", dtype="bfloat16", training="lora"),
    "QLoRA r=8": dict(mode="training", dtype="bfloat16", training="qlora", efficiency_config=INT4),
}
#: what a caller's scenario passes on to every standard one
COMMON_FIELDS = (
    "batch_size",
    "sequence_length",
    "device",
    "optimizer",
    "overhead_bytes",
    "attn_implementation",
    "gradient_checkpointing",
)


def standard_breakdowns(model: Any, scenario: MemoryScenario | None = None, **common: Any) -> list[MemoryBreakdown]:
    """One breakdown per standard scenario. The `COMMON_FIELDS` of ``scenario`` (batch size, sequence
    length, device, optimizer, ...), then ``common``, apply to all of them."""
    from .estimator import estimate_memory

    base = {} if scenario is None else {k: getattr(scenario, k) for k in COMMON_FIELDS}
    return [
        estimate_memory(model, MemoryScenario(**{**kwargs, **base, **common}), label=label)
        for label, kwargs in STANDARD_SCENARIOS.items()
    ]
