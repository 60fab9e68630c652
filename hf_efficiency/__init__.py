"""hf-efficiency: LLM efficiency methods as a Hugging Face transformers plugin.

``import hf_efficiency`` registers the plugin with transformers (idempotent): the
``quant_method="hf_efficiency"`` quantizer, the ``efficiency_config=`` keyword of every
``from_pretrained``, and the ``draft_model=`` / ``speculative=`` keywords of ``generate`` (speculative
decoding, `hf_efficiency.speculative`).
"""

__version__ = "0.1.0"

from .attention import QuantizedKVCache  # noqa: E402
from .config import (  # noqa: E402
    FORMAT_VERSION,
    QUANT_METHOD,
    ActivationSpec,
    CalibrationSpec,
    EfficiencyConfig,
    PeftSpec,
    QuantizationSpec,
    SpeculativeConfig,
    SpeculativeSpec,
)
from .decoding import compiled_generate_kwargs, cpu_compile_config  # noqa: E402
from .integration.qat import convert_qat  # noqa: E402
from .integration.registry import register  # noqa: E402
from .integration.sequential import quantize_sequential  # noqa: E402
from .memory import (  # noqa: E402
    MemoryBreakdown,
    MemoryMeasurement,
    MemoryScenario,
    TrainingSetup,
    estimate_memory,
    measure_memory,
)
from .peft import apply_peft  # noqa: E402
from .quant import QuantLinear, quantize_weight  # noqa: E402
from .quant.modules.qat import prepare_qat  # noqa: E402

register()

# Distillation names resolve on first use (they import transformers.Trainer).
_DISTILL_EXPORTS = (
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "MutualDistillationTrainer",
    "MutualDistillationTrainingArguments",
    "SnapshotCallback",
    "StudentEnsemble",
    "make_student",
)


# Community-format readers (GGUF, GPTQ, AWQ, compressed-tensors), also on first use.
_FORMAT_EXPORTS = ("load_compressed", "load_gguf")
# Writers of the formats serving engines load (compressed-tensors, GPTQ, AWQ, GGUF), also on first use.
_EXPORT_EXPORTS = ("export_model",)


def __getattr__(name: str):
    if name in _DISTILL_EXPORTS:
        from . import distill

        return getattr(distill, name)
    if name in _FORMAT_EXPORTS:
        from . import formats

        return getattr(formats, name)
    if name in _EXPORT_EXPORTS:
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_DISTILL_EXPORTS,
    *_FORMAT_EXPORTS,
    *_EXPORT_EXPORTS,
    "ActivationSpec",
    "CalibrationSpec",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "EfficiencyConfig",
    "MemoryBreakdown",
    "MemoryMeasurement",
    "MemoryScenario",
    "PeftSpec",
    "QuantLinear",
    "QuantizationSpec",
    "QuantizedKVCache",
    "SpeculativeConfig",
    "SpeculativeSpec",
    "TrainingSetup",
    "__version__",
    "apply_peft",
    "compiled_generate_kwargs",
    "convert_qat",
    "cpu_compile_config",
    "prepare_qat",
    "estimate_memory",
    "measure_memory",
    "quantize_weight",
    "register",
    "quantize_sequential",
]
