"""The ONLY module that touches transformers' registries and patches.

:func:`register` (run by ``import hf_efficiency``; idempotent, reload-safe):

1. registers `EfficiencyConfig` and `EfficiencyHfQuantizer` under ``quant_method="hf_efficiency"``
   (stable hook: ``transformers.quantizers.register_*``);
2. adds ``efficiency_config=`` to every ``from_pretrained`` by wrapping
   ``PreTrainedModel.from_pretrained`` (Auto classes forward unknown kwargs to it); it is an
   alias of ``quantization_config=`` and accepts an `EfficiencyConfig` or its dict; with
   ``keep_compressed=True`` the call reads a GGUF file (``gguf_file=``) or a GPTQ / AWQ /
   compressed-tensors folder into our modules (`hf_efficiency.formats`) instead;
3. routes ``push_to_hub`` of models carrying an `EfficiencyConfig` through
   :func:`hf_efficiency.hub.push.push_to_hub` (adds our model card; ``export_format=`` uploads an export),
   and adds ``export_format=`` (with ``lossy=``, ``tokenizer=``, ``export_options=``) to
   ``save_pretrained``: it then writes the format with :func:`hf_efficiency.export.export_model` and
   returns its `ExportReport`;
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
   ``AttentionMaskInterface``;
7. when peft is installed, teaches it our `QuantLinear`: LoRA and IA3 layer classes are dispatched
   for it (``LoraModel._create_new_module`` / ``IA3Model._create_new_module`` try ours first),
   ``target_modules="all-linear"`` includes it, and ``prepare_model_for_kbit_training`` enables
   gradient checkpointing and input gradients for our models as it does for the quantizers it knows.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from typing import Any

_PATCH_MARK = "_hf_efficiency_original"


def _register_quantizer() -> None:
    from transformers.quantizers import auto

    from ..config import QUANT_METHOD, EfficiencyConfig
    from .quantizer import EfficiencyHfQuantizer

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
            from ..config import EfficiencyConfig

            if kwargs.get("quantization_config") is not None:
                raise ValueError(
                    "pass either efficiency_config= or quantization_config=, not both "
                    "(efficiency_config is an alias of quantization_config=EfficiencyConfig(...))"
                )
            kwargs["quantization_config"] = EfficiencyConfig.coerce(efficiency_config)
        _patch_peft()  # peft may have been half-imported when we registered
        requested = kwargs.get("quantization_config")
        if getattr(requested, "keep_compressed", False):
            from .compressed_loading import from_pretrained_compressed

            return from_pretrained_compressed(cls, args, kwargs)
        from .checkpoint import check_local_folder
        from .quantizer import conversion_error_mark, conversion_error_since

        if not kwargs.get("subfolder"):
            check_local_folder(
                args[0] if args else kwargs.get("pretrained_model_name_or_path"), kwargs.get("gguf_file")
            )
        mark = conversion_error_mark()
        try:
            return original(cls, *args, **kwargs)
        except RuntimeError as exc:  # transformers' "issues during automatic conversion": raise ours instead
            ours = conversion_error_since(mark)
            if ours is None:
                raise
            raise ours from exc

    setattr(from_pretrained, _PATCH_MARK, original)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _patch_auto_config() -> None:
    """``AutoConfig.from_pretrained`` (run first by every ``AutoModel*.from_pretrained``) on a local folder that
    holds GGUF files but no config.json, without ``gguf_file=``: name the GGUF file to pass instead of transformers'
    "Unrecognized model ... model_type"."""
    from transformers import AutoConfig

    current = AutoConfig.__dict__["from_pretrained"].__func__
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        try:
            return original(cls, *args, **kwargs)
        except (ValueError, OSError) as exc:
            from .checkpoint import check_local_folder

            if not kwargs.get("subfolder"):
                path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                try:
                    check_local_folder(path, kwargs.get("gguf_file"))
                except ValueError as ours:
                    raise ours from exc
            raise

    setattr(from_pretrained, _PATCH_MARK, original)
    AutoConfig.from_pretrained = classmethod(from_pretrained)


def _patch_push_to_hub() -> None:
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__.get("push_to_hub", PreTrainedModel.push_to_hub)
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        from ..config import EfficiencyConfig

        if isinstance(getattr(self.config, "quantization_config", None), EfficiencyConfig):
            from ..hub.push import push_to_hub as push

            return push(self, repo_id, *args, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    setattr(push_to_hub, _PATCH_MARK, original)
    PreTrainedModel.push_to_hub = push_to_hub


def _patch_save_pretrained() -> None:
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__["save_pretrained"]
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args: Any, export_format: str | None = None, **kwargs: Any):
        if export_format is None:
            for key in ("lossy", "tokenizer", "export_options"):
                if key in kwargs:
                    raise TypeError(f"save_pretrained(): {key}= applies with export_format= only")
            if _saves_atomically(self, kwargs):
                return _atomic_save_pretrained(original, self, save_directory, *args, **kwargs)
            return original(self, save_directory, *args, **kwargs)
        from ..export import export_model

        if args:
            raise TypeError("save_pretrained(..., export_format=...) takes its options as keywords")
        options = dict(kwargs.pop("export_options", None) or {})
        allowed = {"lossy", "tokenizer", "dtype", "max_shard_size"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"save_pretrained(..., export_format={export_format!r}) got unexpected keyword argument(s) "
                f"{', '.join(unknown)}; allowed: {', '.join(sorted(allowed | {'export_options'}))}"
            )
        return export_model(self, save_directory, export_format, **kwargs, **options)

    setattr(save_pretrained, _PATCH_MARK, original)
    PreTrainedModel.save_pretrained = save_pretrained


def _saves_atomically(model, kwargs: dict[str, Any]) -> bool:
    """Our models (an `EfficiencyConfig` in their config) save through a staging folder, except a save that also
    pushes (transformers uploads the folder it wrote) or one on a non-main process (it writes nothing)."""
    from ..config import EfficiencyConfig

    if not isinstance(getattr(model.config, "quantization_config", None), EfficiencyConfig):
        return False
    if kwargs.get("push_to_hub", False) or not kwargs.get("is_main_process", True):
        return False
    on_this_rank = getattr(model, "should_save_on_this_rank", None)  # False on ranks > 0 of torch.distributed
    return on_this_rank is None or bool(on_this_rank(True))


def _atomic_save_pretrained(original, model, save_directory, *args: Any, **kwargs: Any):
    """``save_pretrained`` into a staging folder, one save id in every shard and the index, then published
    into ``save_directory`` with the earlier save's weight files removed (`hf_efficiency.saving`)."""
    from ..saving import new_save_id, staged_save, stamp_index

    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained: {save_directory!r} is a file, not a folder")
    save_id = new_save_id()
    quantizer = getattr(model, "hf_quantizer", None)
    with staged_save(save_directory) as staging:
        if quantizer is not None:
            quantizer.next_save_id = save_id
        try:
            result = original(model, staging, *args, **kwargs)
        finally:
            if quantizer is not None:
                quantizer.next_save_id = None
        stamp_index(staging, save_id)
    return result


def _register_student_ensemble() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..distill.ensemble import StudentEnsemble, StudentEnsembleConfig

    AutoConfig.register(StudentEnsembleConfig.model_type, StudentEnsembleConfig, exist_ok=True)
    AutoModelForCausalLM.register(StudentEnsembleConfig, StudentEnsemble, exist_ok=True)


def _patch_generate() -> None:
    from transformers.generation.utils import GenerationMixin

    current = GenerationMixin.__dict__["generate"]
    original = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original)
    def generate(self, *args: Any, **kwargs: Any):
        from ..attention.kv_cache import cache_from_generate_kwargs, saved_kv_cache
        from ..speculative.generate import GENERATE_KWARGS, prepare_generate_kwargs, wants_speculative

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

    from ..attention.functions import BLOCKWISE, LOWRANK, blockwise_attention_forward, lowrank_attention_forward

    AttentionInterface.register(BLOCKWISE, blockwise_attention_forward)
    AttentionMaskInterface.register(BLOCKWISE, sdpa_mask)
    AttentionInterface.register(LOWRANK, lowrank_attention_forward)
    AttentionMaskInterface.register(LOWRANK, sdpa_mask)


def _wrap_static(owner: Any, name: str, make) -> None:
    """Replace the static method ``owner.name`` by ``make(original)``, once (reload-safe)."""
    current = owner.__dict__[name]
    current = current.__func__ if isinstance(current, staticmethod) else current
    original = getattr(current, _PATCH_MARK, current)
    wrapper = make(original)
    setattr(wrapper, _PATCH_MARK, original)
    setattr(owner, name, staticmethod(wrapper))


class _AfterImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: run ``callback`` right after module ``name`` has been executed."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; find_spec below must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_then_callback
        return spec


_PEFT_PATCHED = False


def _patch_peft() -> None:
    """Teach peft our `QuantLinear` now if peft is imported, else right after it is: importing peft
    here could run inside transformers' own initialization (the autoload hook imports us there). When
    peft is half-imported right now (transformers' Trainer imports peft, which imports transformers'
    models, which run our autoload), nothing can be done yet: every ``from_pretrained`` retries."""
    if _PEFT_PATCHED:
        return
    module = sys.modules.get("peft")
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        _apply_peft_patches()
    elif module is None and not any(isinstance(f, _AfterImport) and f.name == "peft" for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("peft", _apply_peft_patches))


def _apply_peft_patches() -> None:
    global _PEFT_PATCHED
    try:
        import peft
        from peft.tuners import tuners_utils
        from peft.tuners.ia3.model import IA3Model
        from peft.tuners.lora.model import LoraModel
        from peft.utils import other as peft_other
    except ImportError:
        return
    from ..peft.ia3 import dispatch_ia3
    from ..peft.lora import dispatch_lora
    from ..quant.modules.linear import QuantLinear

    def dispatching(ours):
        def make(original):
            @functools.wraps(original)
            def _create_new_module(config, adapter_name, target, **kwargs):
                module = ours(target, adapter_name, config, **kwargs)
                return module if module is not None else original(config, adapter_name, target, **kwargs)

            return _create_new_module

        return make

    _wrap_static(LoraModel, "_create_new_module", dispatching(dispatch_lora))
    _wrap_static(IA3Model, "_create_new_module", dispatching(dispatch_ia3))

    current = tuners_utils._maybe_include_all_linear_layers
    original_all_linear = getattr(current, _PATCH_MARK, current)

    @functools.wraps(original_all_linear)
    def _maybe_include_all_linear_layers(peft_config, model):
        targets = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
        peft_config = original_all_linear(peft_config, model)
        if all_linear:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            nested = {
                f"{prefix}.{suffix}"
                for prefix, m in model.named_modules()
                if isinstance(m, tuners_utils.BaseTunerLayer)
                for suffix, _ in m.named_modules()
                if suffix
            }
            ours = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m is not head} - nested
            peft_config.target_modules = set(peft_config.target_modules) | ours
        return peft_config

    setattr(_maybe_include_all_linear_layers, _PATCH_MARK, original_all_linear)
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers

    from ..peft.kbit import prepare_model_for_kbit_training

    current = peft_other.prepare_model_for_kbit_training
    setattr(prepare_model_for_kbit_training, _PATCH_MARK, getattr(current, _PATCH_MARK, current))
    for module in (peft_other, peft.utils, peft):
        if hasattr(module, "prepare_model_for_kbit_training"):
            module.prepare_model_for_kbit_training = prepare_model_for_kbit_training
    _PEFT_PATCHED = True


def register() -> None:
    """Register hf-efficiency with transformers (safe to call any number of times)."""
    _register_quantizer()
    _register_student_ensemble()
    _patch_from_pretrained()
    _patch_auto_config()
    _patch_push_to_hub()
    _patch_save_pretrained()
    _patch_generate()
    _register_attention()
    _patch_peft()


def is_registered() -> bool:
    from transformers import PreTrainedModel
    from transformers.quantizers import auto

    from ..config import QUANT_METHOD

    return QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING and hasattr(
        PreTrainedModel.__dict__["from_pretrained"].__func__, _PATCH_MARK
    )
