"""``convert_qat``: the end of quantization-aware training, wired to transformers like a loaded model."""

from __future__ import annotations

from torch import nn

from ..data import base_model_of
from ..quant.modules.qat import convert_qat_modules
from .quantizer import attach_quantizer


def convert_qat(model: nn.Module, training: str | None = None) -> nn.Module:
    """Replace every `FakeQuantLinear` of ``model`` by a packed `QuantLinear`, in place, and return it.

    ``training``: how the model was trained (e.g. ``"distilled from the float model on 200k tokens of
    KJV"``); the model card (`render_model_card`, ``push_to_hub``) names it beside the method.

    The packed layers compute with exactly the weights the QAT model computed with. The model
    then carries ``config.quantization_config`` (the `EfficiencyConfig`, ``method="rtn"``) and a
    pre-quantized ``hf_quantizer`` as if loaded by ``from_pretrained``, so ``save_pretrained``
    writes a packed checkpoint that a plain ``AutoModelForCausalLM.from_pretrained`` reloads
    (after ``import hf_efficiency``). The model is left in eval mode.
    """
    if training is not None and not isinstance(training, str):
        raise TypeError(f"training must be a string describing the training, got {type(training).__name__}")
    config, names = convert_qat_modules(model)
    if config.base_model is None:
        config.base_model = base_model_of(getattr(model.config, "_name_or_path", None))
    attach_quantizer(model, config, names)
    model.hf_efficiency_training = "quantization-aware training (QAT)" + (f", {training}" if training else "")
    model.eval()
    return model
