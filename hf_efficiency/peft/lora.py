"""LoRA on `QuantLinear` (QLoRA on our quantized models), dispatched by peft's ``LoraModel``.

`registry.py` puts `dispatch_lora` in front of peft's own dispatchers when ``hf_efficiency`` is
imported, so ``get_peft_model``, ``PeftModel.from_pretrained`` and ``target_modules="all-linear"``
work on a model quantized by hf-efficiency without ``LoraConfig._register_custom_module``.

Merging is done right (peft#2105): the adapter's delta is added to the *dequantized* weight in
float32 and the sum is put back on the module's own scheme by `requantize_linear` (old grid refitted
by least squares, or a fresh grid, per group, whichever is closer). ``unmerge`` restores the exact
pre-merge tensors instead of subtracting through a second rounding.

A plain LoRA delta is finer than the 4-bit grid, so re-quantizing loses part of it whatever the
rounding (measured in ``benchmarks/peft.py``). QA-LoRA (``LoraConfig(use_qalora=True,
qalora_group_size=g)``, Xu et al. 2023; peft implements it for GPTQ layers only and cannot merge it)
learns a delta that is constant over each group of ``g`` input channels. On an asymmetric
`QuantLinear` whose group size divides ``g`` that delta is a shift of every group's minimum, so it
merges exactly (up to the float16 rounding of the stored minimum): no code changes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.config import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..quant.core.requantize import REQUANTIZE_METHODS, requantize_linear
from ..quant.modules.linear import QuantLinear

#: LoRA options whose computation needs the base layer's float weight inside peft
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "velora_config",
    "arrow_config",
    "use_bdlora",
    "mica",
    "kasa_config",
    "monteclora_config",
)


def snapshot_pre_merge(module: QuantLinear) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.named_parameters(recurse=False) if name.startswith("weight")}


def restore_pre_merge(layer) -> None:
    """``unmerge`` of our LoRA and IA3 layers: put back the base's tensors saved before the first merge."""
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    base = layer.get_base_layer()
    # the module's current device and dtype: a no-op unless the model was moved or cast while merged
    saved = {
        name: t.to(device=getattr(base, name).device, dtype=getattr(base, name).dtype)
        for name, t in layer._pre_merge.items()
    }
    base.replace_tensors(**saved)
    layer._pre_merge = None
    layer.merged_adapters.clear()


class QuantLoraLinear(lora_layer.Linear):
    """peft's LoRA ``Linear`` over a `QuantLinear`: the forward is peft's (frozen quantized base plus
    ``B(A(dropout(x))) * scaling``); merging goes through the quantized scheme.

    ``merge_method`` (class attribute, or per instance): ``"refit"`` (default) or ``"rtn"``.
    """

    merge_method: str = "refit"

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        on = [name for name in _UNSUPPORTED if getattr(config, name, None) not in (None, False, 0)]
        if on:
            raise ValueError(
                f"LoRA on hf-efficiency's QuantLinear supports plain LoRA and rsLoRA; {', '.join(on)} "
                "need(s) the base layer's float weight. Dequantize the model first "
                "(from_pretrained(..., efficiency_config=..., dequantize=True)) to use it."
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._pre_merge: dict[str, torch.Tensor] | None = None

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        if getattr(config, "use_qalora", False):
            from peft.tuners.lora.variants import QALoraLinearVariant

            return QALoraLinearVariant()  # peft's pooled forward; merging is ours
        return None

    def _qalora_delta(self, adapter: str) -> torch.Tensor:
        """QA-LoRA's delta per (output, pooled group) ``[out, in / g]``, in the units of the weight."""
        g = self.qalora_group_size[adapter]
        groups = self.in_features // g
        ba = self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()
        return ba * (self.scaling[adapter] * groups / g)  # peft pools by the mean times the group count

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter in self.lora_variant:  # QA-LoRA: constant over each pooled group
            return self._qalora_delta(adapter).repeat_interleave(self.qalora_group_size[adapter], dim=1)
        return super().get_delta_weight(adapter)

    def _folds_exactly(self, adapter: str) -> bool:
        base = self.get_base_layer()
        return (
            adapter in self.lora_variant
            and base.weight_min is not None
            and base.group_size is not None
            and self.qalora_group_size[adapter] % base.group_size == 0
        )

    def _fold_into_minima(self, adapter: str) -> None:
        """Add a QA-LoRA delta to the group minima (and the kept outliers): the codes stay."""
        base = self.get_base_layer()
        delta = self._qalora_delta(adapter)
        per_group = delta.repeat_interleave(self.qalora_group_size[adapter] // base.group_size, dim=1)
        m = base.weight_min
        folded = {"weight_min": (m.float() + per_group.to(m.device)).to(m.dtype)}
        if base.weight_outlier_index is not None:
            cols = base.weight_outlier_index.long() // self.qalora_group_size[adapter]
            v = base.weight_outlier_value
            folded["weight_outlier_value"] = (v.float() + delta.to(v.device).gather(1, cols)).to(v.dtype)
        base.replace_tensors(**folded)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas to the dequantized weight and re-quantize it with the module's scheme."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.lora_A]
        if not adapter_names:
            return
        if self.merge_method not in REQUANTIZE_METHODS:
            raise ValueError(
                f"merge_method={self.merge_method!r} is not allowed; allowed values: {', '.join(REQUANTIZE_METHODS)}"
            )
        base = self.get_base_layer()
        exact = [a for a in adapter_names if self._folds_exactly(a)]
        rest = [a for a in adapter_names if a not in exact]
        with torch.no_grad():
            deltas = {a: self.get_delta_weight(a).float() for a in adapter_names}
            if safe_merge and not all(torch.isfinite(d).all() for d in deltas.values()):
                raise ValueError(f"NaNs detected in the merged weights; the adapter(s) {adapter_names} seem broken")
            if self._pre_merge is None:
                self._pre_merge = snapshot_pre_merge(base)
            for name in exact:
                self._fold_into_minima(name)
            if rest:
                weight = base.dequantize_weight(torch.float32)
                for name in rest:
                    weight += deltas[name].to(weight.device)
                requantize_linear(base, weight, self.merge_method)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the quantized tensors exactly as they were before the first merge."""
        restore_pre_merge(self)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_lora(target: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
    """peft dispatcher: a `QuantLoraLinear` for a `QuantLinear` target, ``None`` otherwise."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, QuantLinear):
        return None
    if any(isinstance(base, key) for key in (config._custom_modules or {})):
        return None  # the user's own mapping wins
    kwargs.pop("loaded_in_8bit", None)
    kwargs.pop("loaded_in_4bit", None)
    return QuantLoraLinear(target, adapter_name, config=config, **kwargs)
