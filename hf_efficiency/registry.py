"""The ONLY module that touches transformers' registries and patches.

:func:`register` (run by ``import hf_efficiency``; idempotent, reload-safe):

1. registers `EfficiencyConfig` and `EfficiencyHfQuantizer` under ``quant_method="hf_efficiency"``
   (stable hook: ``transformers.quantizers.register_*``);
2. adds ``efficiency_config=`` to every ``from_pretrained`` by wrapping
   ``PreTrainedModel.from_pretrained`` (Auto classes forward unknown kwargs to it); it is an
   alias of ``quantization_config=`` and accepts an `EfficiencyConfig` or its dict;
3. routes ``push_to_hub`` of models carrying an `EfficiencyConfig` through
   :func:`hf_efficiency.hub.push.push_to_hub` (adds our model card);
4. registers `StudentEnsembleConfig` / `StudentEnsemble` with ``AutoConfig`` and
   ``AutoModelForCausalLM`` (model_type ``hf_efficiency_student_ensemble``), so a saved ensemble loads
   with ``AutoModelForCausalLM.from_pretrained``;
5. wraps ``GenerationMixin.generate`` so that ``draft_model=`` / ``speculative=`` (or a saved
   ``EfficiencyConfig(speculative=...)``) run speculative decoding as transformers'
   ``custom_generate``; every other call reaches transformers' generate unchanged, except that a
   model saved with ``EfficiencyConfig(attention={"kv_cache_bits": ...})`` gets a `QuantizedKVCache`
   when the call passes no cache, and ``cache_implementation="hf_efficiency_quantized"`` (with
   ``cache_config``) builds one;
6. registers the attention functions ``hf_efficiency_blockwise`` and ``hf_efficiency_lowrank`` with
   ``AttentionInterface``, and transformers' boolean ``sdpa_mask`` builder under the same names with
   ``AttentionMaskInterface``.
"""

from __future__ import annotations

import functools
from typing import Any

_PATCH_MARK = "_hf_efficiency_original"


def _register_quantizer() -> None:
    from transformers.quantizers import auto

    from .config import QUANT_METHOD, EfficiencyConfig
    from .quant.quantizer import EfficiencyHfQuantizer

    # register_* refuse duplicates; after a module reload the classes are new objects, so set
    # the entries directly when they already exist.
    if QUANT_METHOD in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = EfficiencyConfig
    else:
        auto.register_quantization_config(QUANT_METHOD)(EfficiencyConfig)
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = EfficiencyHfQuantizer
    else:
        auto.register_quantizer(QUANT_METHOD)(EfficiencyHfQuantizer)
    # Let users pass loading attributes (dequantize=True) when loading our checkpoints.
    if EfficiencyConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (
            *(t for t in auto.LOADING_ATTRIBUTES_CONFIG_TYPES if getattr(t, "__name__", "") != "EfficiencyConfig"),
            EfficiencyConfig,
        )


def _patch_from_pretrained() -> None:
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__["from_pretrained"].__func__
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def from_pretrained(cls, *args: Any, efficiency_config: Any = None, **kwargs: Any):
        if efficiency_config is not None:
            from .config import EfficiencyConfig

            if kwargs.get("quantization_config") is not None:
                raise ValueError(
                    "pass either efficiency_config= or quantization_config=, not both "
                    "(efficiency_config is an alias of quantization_config=EfficiencyConfig(...))"
                )
            kwargs["quantization_config"] = EfficiencyConfig.coerce(efficiency_config)
        return original(cls, *args, **kwargs)

    setattr(from_pretrained, _PATCH_MARK, original)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _patch_push_to_hub() -> None:
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__.get("push_to_hub", PreTrainedModel.push_to_hub)
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        from .config import EfficiencyConfig

        if isinstance(getattr(self.config, "quantization_config", None), EfficiencyConfig):
            from .hub.push import push_to_hub as push

            return push(self, repo_id, *args, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    setattr(push_to_hub, _PATCH_MARK, original)
    PreTrainedModel.push_to_hub = push_to_hub


def _register_student_ensemble() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .distill.ensemble import StudentEnsemble, StudentEnsembleConfig

    AutoConfig.register(StudentEnsembleConfig.model_type, StudentEnsembleConfig, exist_ok=True)
    AutoModelForCausalLM.register(StudentEnsembleConfig, StudentEnsemble, exist_ok=True)


def _patch_generate() -> None:
    from transformers.generation.utils import GenerationMixin

    current = GenerationMixin.__dict__["generate"]
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def generate(self, *args: Any, **kwargs: Any):
        from .attention.kv_cache import cache_from_generate_kwargs, saved_kv_cache
        from .speculative.generate import GENERATE_KWARGS, prepare_generate_kwargs, wants_speculative

        requested = cache_from_generate_kwargs(kwargs)  # cache_implementation="hf_efficiency_quantized"
        if requested is not None:
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise ValueError("pass either cache= or cache_implementation='hf_efficiency_quantized', not both")
            kwargs["cache"] = requested
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            cache = saved_kv_cache(self)  # EfficiencyConfig(attention={"kv_cache_bits": ...})
            if cache is not None:
                kwargs["cache"] = cache
        if wants_speculative(self, kwargs):
            return original(self, *args, **prepare_generate_kwargs(self, args, kwargs))
        for key in GENERATE_KWARGS:
            kwargs.pop(key, None)  # speculative=False, draft_tokenizer without a draft
        return original(self, *args, **kwargs)

    setattr(generate, _PATCH_MARK, original)
    GenerationMixin.generate = generate


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from .attention.functions import BLOCKWISE, LOWRANK, blockwise_attention_forward, lowrank_attention_forward

    AttentionInterface.register(BLOCKWISE, blockwise_attention_forward)
    AttentionMaskInterface.register(BLOCKWISE, sdpa_mask)
    AttentionInterface.register(LOWRANK, lowrank_attention_forward)
    AttentionMaskInterface.register(LOWRANK, sdpa_mask)


def register() -> None:
    """Register hf-efficiency with transformers (safe to call any number of times)."""
    _register_quantizer()
    _register_student_ensemble()
    _patch_from_pretrained()
    _patch_push_to_hub()
    _patch_generate()
    _register_attention()


def is_registered() -> bool:
    from transformers import PreTrainedModel
    from transformers.quantizers import auto

    from .config import QUANT_METHOD

    return QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING and hasattr(
        PreTrainedModel.__dict__["from_pretrained"].__func__, _PATCH_MARK
    )
