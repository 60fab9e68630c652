"""The standard comparison: fp32 / bf16 / int8 / int4 inference and full fine-tuning / LoRA /
QLoRA training of one model, as `estimate_memory` breakdowns (for tables and the PNG chart)."""

from __future__ import annotations

from typing import Any

from .estimator import MemoryBreakdown, estimate_memory

INT8 = {"quantization": {"bits": 8, "group_size": None, "symmetric": True}}
INT4 = {"quantization": {"bits": 4, "group_size": 128}}

#: label -> estimate_memory keyword arguments (batch, sequence and device come from the caller)
STANDARD_SCENARIOS: dict[str, dict[str, Any]] = {
    "fp32 inference": dict(mode="inference", dtype="float32"),
    "bf16 inference": dict(mode="inference", dtype="bfloat16"),
    "int8 inference": dict(mode="inference", dtype="bfloat16", efficiency_config=INT8),
    "int4 inference": dict(mode="inference", dtype="bfloat16", efficiency_config=INT4),
    "full fine-tuning": dict(mode="training", dtype="bfloat16", mixed_precision="bf16", training="full"),
    "LoRA r=8": dict(mode="training", dtype="bfloat16", training="lora"),
    "QLoRA r=8": dict(mode="training", dtype="bfloat16", training="qlora", efficiency_config=INT4),
}


def standard_breakdowns(model: Any, **common: Any) -> list[MemoryBreakdown]:
    """One breakdown per standard scenario; ``common`` (batch_size, sequence_length, device,
    optimizer, ...) applies to all of them."""
    return [estimate_memory(model, label=label, **{**kwargs, **common}) for label, kwargs in STANDARD_SCENARIOS.items()]
