"""`EfficiencyOptimumQuantizer`: hf-efficiency behind optimum's `OptimumQuantizer` interface.

    from hf_efficiency.integration.optimum import EfficiencyOptimumQuantizer
    quantizer = EfficiencyOptimumQuantizer.from_pretrained("path-or-id")
    quantizer.quantize("out", efficiency_config=EfficiencyConfig(quantization={"bits": 4}))

Requires `optimum` (``pip install hf-efficiency[optimum]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    from optimum.quantization_base import OptimumQuantizer
except ImportError as exc:  # pragma: no cover - exercised only without optimum
    raise ImportError("EfficiencyOptimumQuantizer needs optimum: pip install 'hf-efficiency[optimum]'") from exc

from ..config import EfficiencyConfig


class EfficiencyOptimumQuantizer(OptimumQuantizer):
    """Quantizes a causal LM with an `EfficiencyConfig` and writes a complete model folder."""

    def __init__(self, model_name_or_path: str, efficiency_config: EfficiencyConfig | dict | None = None) -> None:
        self.model_name_or_path = model_name_or_path
        self.efficiency_config = None if efficiency_config is None else EfficiencyConfig.coerce(efficiency_config)

    @classmethod
    def from_pretrained(
        cls, model_or_path: str | Path, file_name: str | None = None, efficiency_config: Any = None
    ) -> "EfficiencyOptimumQuantizer":
        if file_name is not None:
            raise ValueError("file_name is not used by hf-efficiency (weights are read with from_pretrained)")
        return cls(os.fspath(model_or_path), efficiency_config)

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        efficiency_config: Any = None,
        max_shard_size: str = "5GB",
        **kwargs: Any,
    ) -> Path:
        """Load, quantize, save weights + tokenizer + generation config + model card; return ``save_dir``."""
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: hf-efficiency writes standard safetensors names")
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        cfg = efficiency_config if efficiency_config is not None else self.efficiency_config
        if cfg is None:
            raise ValueError("no efficiency_config: pass one to from_pretrained() or quantize()")
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from ..hub.model_card import save_model_card

        model = AutoModelForCausalLM.from_pretrained(
            self.model_name_or_path, efficiency_config=EfficiencyConfig.coerce(cfg)
        )
        save_dir = Path(save_dir)
        model.save_pretrained(save_dir, max_shard_size=max_shard_size)
        try:
            AutoTokenizer.from_pretrained(self.model_name_or_path).save_pretrained(save_dir)
        except (OSError, ValueError):
            pass  # a weights-only folder has no tokenizer
        try:
            GenerationConfig.from_pretrained(self.model_name_or_path).save_pretrained(save_dir)
        except OSError:
            pass
        save_model_card(model, save_dir)
        return save_dir
