"""(IA)^3 on `QuantLinear`, dispatched by peft's ``IA3Model`` (see `registry.py`).

The forward is peft's: the quantized output (attention projections) or input (feed-forward layers)
is scaled by the learned vector ``l``. Merging an output scaling is exact up to the float16 rounding
of the stored scales: every row's scale and minimum (and bias) are multiplied by its ``l`` (when all
``l > 0``). An input scaling changes the weight column by column, which the per-row groups cannot
express, so it is merged like LoRA: dequantize, scale in float32, re-quantize with the module's scheme.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.ia3 import layer as ia3_layer
from peft.tuners.ia3.config import IA3Config
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..quant.core.requantize import requantize_linear
from ..quant.modules.linear import QuantLinear
from .lora import restore_pre_merge, snapshot_pre_merge


class QuantIA3Linear(ia3_layer.Linear):
    """peft's IA3 ``Linear`` over a `QuantLinear` (peft's ``IA3Layer`` accepts only float layer types)."""

    def __init__(
        self,
        base_layer: torch.nn.Module,
        adapter_name: str,
        config: IA3Config,
        is_feedforward: bool = False,
        **kwargs: Any,
    ) -> None:
        torch.nn.Module.__init__(self)
        # IA3Layer.__init__, for a layer type it does not know
        self.base_layer = base_layer
        self.ia3_l = torch.nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.is_feedforward = is_feedforward
        quant = self.get_base_layer()
        self.in_features, self.out_features = quant.in_features, quant.out_features
        self.fan_in_fan_out = False
        self.is_target_conv_1d_layer = False
        self._active_adapter = adapter_name
        self._pre_merge: dict[str, torch.Tensor] | None = None
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.ia3_l]
        if not adapter_names:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            scaling = torch.ones(self.in_features if self.is_feedforward else self.out_features)
            for name in adapter_names:
                scaling = scaling * self.ia3_l[name].detach().float().flatten().cpu()
            if safe_merge and not torch.isfinite(scaling).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter(s) {adapter_names} seem broken")
            if self._pre_merge is None:
                self._pre_merge = snapshot_pre_merge(base)
                if base.bias is not None:
                    self._pre_merge["bias"] = base.bias.detach().clone()
            scaling = scaling.to(base.weight_scale.device)
            bias = None
            if not self.is_feedforward and base.bias is not None:
                bias = (base.bias.float() * scaling.to(base.bias.device)).to(base.bias.dtype)
            if self.is_feedforward or not bool((scaling > 0).all()):
                weight = base.dequantize_weight(torch.float32)
                weight *= scaling[None, :] if self.is_feedforward else scaling[:, None]
                requantize_linear(base, weight)
                if bias is not None:
                    base.replace_tensors(bias=bias)
            else:  # per-row scaling: the rows' scales, minima and kept outliers (and bias) scale with it
                rows = {
                    name: (t.float() * scaling[:, None]).to(t.dtype)
                    for name in ("weight_scale", "weight_min", "weight_outlier_value")
                    if (t := getattr(base, name)) is not None
                }
                base.replace_tensors(**rows, bias=bias)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the quantized tensors (and bias) exactly as they were before the first merge."""
        restore_pre_merge(self)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


def dispatch_ia3(target: torch.nn.Module, adapter_name: str, config: IA3Config, **kwargs: Any):
    """IA3 counterpart of `dispatch_lora`: a `QuantIA3Linear` for a `QuantLinear` target, else ``None``."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, QuantLinear):
        return None
    return QuantIA3Linear(target, adapter_name, config=config, is_feedforward=kwargs.get("is_feedforward", False))
