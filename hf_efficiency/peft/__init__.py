"""Parameter-efficient fine-tuning on hf-efficiency's models.

* peft's LoRA (and QA-LoRA), IA3 and prompt tuning on our quantized `QuantLinear` layers (QLoRA):
  `lora.py`, `ia3.py`, `kbit.py`; `registry.py` teaches peft these layer classes, so peft's own API
  (``get_peft_model``, ``PeftModel.from_pretrained``, ``merge_and_unload``) works unchanged.
* Methods peft lacks, as ``EfficiencyConfig(peft={...})``: BitFit (`bitfit.py`), freezing the lower
  layers (`freeze.py`), bottleneck adapters (`adapters.py`); one entry point, `apply_peft` (`methods.py`).

The names that need the peft library (``QuantLoraLinear``, ``QuantIA3Linear``,
``prepare_model_for_kbit_training``) resolve on first use: importing peft while transformers is still
initializing (our autoload hook runs then) would fail.
"""

from .adapters import BottleneckAdapter
from .methods import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    apply_peft,
    load_peft_weights,
    peft_parameter_names,
    peft_spec,
    peft_state_dict,
    print_trainable_parameters,
    save_peft_weights,
    trainable_parameters,
)

_LAZY = {
    "QuantLoraLinear": "lora",
    "dispatch_lora": "lora",
    "QuantIA3Linear": "ia3",
    "dispatch_ia3": "ia3",
    "prepare_model_for_kbit_training": "kbit",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: RUF022
    "QuantLoraLinear",
    "dispatch_lora",
    "QuantIA3Linear",
    "dispatch_ia3",
    "prepare_model_for_kbit_training",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "BottleneckAdapter",
    "apply_peft",
    "load_peft_weights",
    "peft_parameter_names",
    "peft_spec",
    "peft_state_dict",
    "print_trainable_parameters",
    "save_peft_weights",
    "trainable_parameters",
]
