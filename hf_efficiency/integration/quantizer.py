"""`EfficiencyHfQuantizer`: the transformers backend for ``quant_method="hf_efficiency"``.

* on-the-fly (``from_pretrained(fp_model, efficiency_config=...)``): linears become empty
  `QuantLinear` shells on the meta device; each float weight is quantized by `QuantizeOp` as it
  is read from disk, so the full float model never sits in memory. A mixture-of-experts family's
  fused experts modules stay float (meta) until transformers' converters have merged a layer's
  per-expert checkpoint tensors into ``gate_up_proj`` / ``down_proj``; `QuantizeOp` then swaps the
  module for a `QuantExperts` and quantizes the fused tensor expert by expert (one layer's fused
  float tensor in memory at a time).
* calibrated (``awq``, ``gptq``, automatic mixed precision, static activations, SmoothQuant,
  outliers with calibration data): the float weights load as they are, then
  :func:`~.pipeline.quantize_calibrated` runs layer by layer on the calibration data (experts with
  round-to-nearest).
* pre-quantized (our checkpoint): the same shells (`QuantExperts` ones included, unless the checkpoint
  predates quantized experts and stores them in float), then the checkpoint headers are validated and
  the packed tensors load by name.
"""

from __future__ import annotations

import collections
import itertools
import re

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils import logging

from ..config import FORMAT_VERSION, QUANT_METHOD, EfficiencyConfig
from ..data import base_model_of
from ..families import family_of
from ..quant.kernels.cpu import realign_float_tensors
from ..quant.methods import quantize_matrix
from ..quant.modules.experts import GATE_UP, QuantExperts
from ..quant.modules.linear import QuantLinear
from ..quant.modules.replace import (
    dequantize_model,
    experts_to_quantize,
    modules_to_not_convert,
    quant_linear_shell,
    replace_with_quant_linear,
    set_submodule,
    tied_head_name,
    untie_output_embedding,
)
from ..saving import SAVE_ID_KEY, new_save_id
from .checkpoint import check_loaded_values, check_save_ids, checkpoint_keys, validate_checkpoint

logger = logging.get_logger(__name__)


_CONVERSION_ERRORS: collections.deque[tuple[int, Exception]] = collections.deque(maxlen=16)
_CONVERSION_COUNT = itertools.count(1)


def record_conversion_error(exc: Exception) -> None:
    """Remember an error raised while quantizing a tensor during loading (transformers only logs it)."""
    _CONVERSION_ERRORS.append((next(_CONVERSION_COUNT), exc))


def conversion_error_mark() -> int:
    """A mark to pass to `conversion_error_since` (taken before a ``from_pretrained`` call)."""
    return _CONVERSION_ERRORS[-1][0] if _CONVERSION_ERRORS else 0


def conversion_error_since(mark: int) -> Exception | None:
    """The first conversion error recorded after ``mark``, if any."""
    return next((exc for n, exc in _CONVERSION_ERRORS if n > mark), None)


class QuantizeOp(ConversionOps):
    """Quantizes one float ``weight`` as it is loaded; emits every companion tensor."""

    def __init__(self, hf_quantizer: "EfficiencyHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name: str | None = None, model=None, **kwargs):
        try:
            return self._convert(input_dict, full_layer_name, model, **kwargs)
        except Exception as exc:
            # transformers logs a conversion error and raises a generic RuntimeError after its load report;
            # `from_pretrained` (registry.py) re-raises this one: our type, naming the module
            record_conversion_error(exc)
            raise

    def _convert(self, input_dict, full_layer_name: str | None, model, **kwargs):
        (value,) = tuple(input_dict.values())
        weight = value[0] if isinstance(value, list) else value
        module, _ = get_module_from_name(model, full_layer_name)
        spec = self.hf_quantizer.quantization_config.quantization
        if not isinstance(module, QuantLinear):
            return self._convert_experts(weight, full_layer_name, model, kwargs.get("missing_keys"))
        if getattr(module, "source_layout", "linear") == "conv1d":
            weight = weight.t()  # GPT-2's Conv1D stores [in, out]
        q = quantize_matrix(
            weight,
            spec,
            module.bits,
            scale_dtype=module.weight_scale.dtype,
            outliers=module.outliers,
            name=full_layer_name.rsplit(".", 1)[0],
        )
        module.invalidate_kernel_cache()
        prefix = full_layer_name.rsplit(".", 1)[0]
        out = {full_layer_name: q.packed, f"{prefix}.weight_scale": q.scale}
        if q.minimum is not None:
            out[f"{prefix}.weight_min"] = q.minimum
        if q.zero is not None:
            out[f"{prefix}.weight_zero"] = q.zero
        if q.outlier_index is not None:
            out[f"{prefix}.weight_outlier_index"] = q.outlier_index
            out[f"{prefix}.weight_outlier_value"] = q.outlier_value
        return out

    def _convert_experts(self, weight, full_layer_name: str, model, missing_keys) -> dict:
        """A fused float expert tensor (``<experts>.gate_up_proj`` or ``.down_proj``): swap the experts module for
        a `QuantExperts` on the tensor's device (first of its two tensors) and quantize the tensor into it."""
        quantizer = self.hf_quantizer
        spec = quantizer.quantization_config.quantization
        desc = family_of(model).experts
        name, _, param = full_layer_name.rpartition(".")
        module = model.get_submodule(name)
        if not isinstance(module, QuantExperts):
            module = QuantExperts.shell(module, spec, name, desc=desc, device=weight.device)
            set_submodule(model, name, module)
        module.quantize_fused_("gate_up" if param == desc.gate_up else "down", weight, spec, name=name)
        quantizer.loaded_expert_tensors.add(full_layer_name)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)  # loaded, under the QuantExperts' own names
        return {}


class EfficiencyHfQuantizer(HfQuantizer):
    """Applies an `EfficiencyConfig` inside ``from_pretrained``."""

    requires_calibration = False
    quantization_config: EfficiencyConfig

    def __init__(self, quantization_config: EfficiencyConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.quantized_modules: list[str] = []
        self.float_experts: list[str] = []  # on the fly: experts modules `QuantizeOp` quantizes as they load
        self.loaded_expert_tensors: set[str] = set()

    def update_attn_implementation(self, config):
        """Build the model with the saved ``attention.implementation`` unless one was asked for."""
        spec = getattr(self.quantization_config, "attention", None)
        if spec is not None and spec.implementation and config._attn_implementation is None:
            config._attn_implementation = spec.implementation
        return config

    # --- what gets converted -----------------------------------------------------------------
    def _skip_list(self, model) -> list[str]:
        return modules_to_not_convert(model, self.quantization_config.quantization)

    @property
    def _calibrates(self) -> bool:
        return not self.pre_quantized and self.quantization_config.needs_calibration

    def _act_mode(self) -> str | None:
        act = getattr(self.quantization_config, "activations", None)
        return None if act is None else act.mode

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # calibrated methods quantize after the float weights are loaded
        self.head_to_untie = None
        skip = self._skip_list(model) if self.quantization_config.quantization is not None else []
        if self.quantization_config.quantization is not None and not self.pre_quantized:
            # a tied head left out of modules_to_not_convert: quantized from the embedding after loading
            self.head_to_untie = tied_head_name(model, skip)
        if self.quantization_config.quantization is not None and not self._calibrates:
            if self.head_to_untie is not None:
                skip = skip + [re.escape(self.head_to_untie)]
            experts = self.pre_quantized and _saved_experts_quantized(model, checkpoint_files)
            if not self.pre_quantized:
                self.float_experts = experts_to_quantize(model, skip)
            self.quantized_modules = replace_with_quant_linear(
                model, self.quantization_config.quantization, skip, self._act_mode(), experts=experts
            )
            if self.pre_quantized and checkpoint_files:
                self.checkpoint_files_by_key = validate_checkpoint(model, checkpoint_files)
                check_save_ids(checkpoint_files)
        if getattr(self.quantization_config, "peft", None) is not None:
            from ..peft.methods import build_peft_structure

            # the saved adapters/biases then load by name; a float base checkpoint has none yet
            build_peft_structure(model, self.quantization_config.peft, expect_missing=not self.pre_quantized)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or self._calibrates:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        if isinstance(module, QuantLinear):
            return tensor_name == "weight"
        if not self.float_experts:
            return False
        desc = family_of(model).experts
        return tensor_name in (desc.gate_up, desc.down) and param_name.rpartition(".")[0] in self.float_experts

    def get_quantize_ops(self):
        return QuantizeOp(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # memory-mapped tensors sit at their file offsets; torch's CPU BLAS rounds by alignment (issue 22)
        realign_float_tensors(model)
        peft = getattr(self.quantization_config, "peft", None)
        if peft is not None:
            from ..peft.methods import init_unloaded_peft_parameters

            init_unloaded_peft_parameters(model, warn=self.pre_quantized)  # before any calibration pass
        if self.float_experts:
            self._check_experts_loaded(model)
        if self.head_to_untie is not None:
            self._quantize_tied_head(model)
        if self._calibrates:
            from ..quant.calibrated.pipeline import quantize_calibrated

            tokenizer = self._calibration_tokenizer(model)
            cfg, report = quantize_calibrated(model, self.quantization_config, tokenizer, self._skip_list(model))
            logger.info(
                f"calibrated {cfg.quantization.method} quantization of {len(report.module_bits)} linears on "
                f"{report.calibration_tokens} tokens took {report.seconds:.1f} s"
            )
            self.quantization_config = cfg
            model.config.quantization_config = cfg
            self.report = report  # model.hf_quantizer.report: what the calibrated pipeline did
        if not self.pre_quantized and self.quantization_config.base_model is None:
            # Record the source model on a copy (never mutate the user's config object).
            cfg = EfficiencyConfig(**self.quantization_config.to_dict())
            cfg.base_model = base_model_of(getattr(model.config, "_name_or_path", None))
            self.quantization_config = cfg
            model.config.quantization_config = cfg
        if self.pre_quantized:
            check_loaded_values(model, getattr(self, "checkpoint_files_by_key", None))
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                module.requires_grad_(False)
                module.invalidate_kernel_cache()
        if peft is not None:
            from ..peft.methods import mark_trainable

            mark_trainable(model, peft)
        return model

    def _quantize_tied_head(self, model) -> None:
        """Untie the output head from the input embeddings (``tie_word_embeddings=False`` from here on, saved so)
        and give it its own quantized copy of the embedding matrix; the input embedding stays float. Calibrated
        methods get a float copy to calibrate and quantize with the other linears."""
        name = self.head_to_untie
        spec = self.quantization_config.quantization
        if self._calibrates:
            untie_output_embedding(model, name, copy=True)
            logger.info(f"{name} is untied from the input embeddings: it is quantized with the other linears")
            return
        linear = untie_output_embedding(model, name, copy=False)
        shell = quant_linear_shell(linear, spec, name, self._act_mode())
        q = quantize_matrix(
            linear.weight, spec, shell.bits, scale_dtype=shell.weight_scale.dtype, outliers=shell.outliers, name=name
        )
        shell.load_quantized(q)
        if linear.bias is not None:
            shell.bias.data = linear.bias.detach().to(shell.bias.dtype)
        set_submodule(model, name, shell.to(linear.weight.device))
        self.quantized_modules = list(getattr(self, "quantized_modules", [])) + [name]
        logger.info(
            f"{name} was tied to the input embeddings: untied (tie_word_embeddings=False) and quantized to "
            f"{shell.bits} bits; the input embedding stays float"
        )

    def _check_experts_loaded(self, model) -> None:
        """Raise naming the first experts module whose float tensors were not all in the checkpoint (it would
        otherwise keep randomly initialized weights)."""
        desc = family_of(model).experts
        for name in self.float_experts:
            for param in (desc.gate_up, desc.down):
                if f"{name}.{param}" not in self.loaded_expert_tensors:
                    raise ValueError(
                        f"the checkpoint has no {param} tensor for {name} (per-expert or fused); the "
                        "mixture-of-experts tensors cannot be quantized"
                    )
        self.quantized_modules += [
            f"{name}.{n}"
            for name in self.float_experts
            for n, m in model.get_submodule(name).named_modules()
            if isinstance(m, QuantLinear)
        ]

    def _calibration_tokenizer(self, model):
        from transformers import AutoTokenizer

        source = self.quantization_config.calibration.tokenizer or getattr(model.config, "_name_or_path", None)
        if not source:
            raise ValueError(
                "calibrated quantization needs a tokenizer: set calibration.tokenizer to a tokenizer name or path"
            )
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(
                f"could not load a tokenizer from {source!r} for calibration ({e}); set calibration.tokenizer"
            ) from e

    # --- saving -----------------------------------------------------------------------------
    #: the id `save_pretrained` stamps on every shard and the index of the save under way (`hf_efficiency.saving`)
    next_save_id: str | None = None

    def get_state_dict_and_metadata(self, model):
        return None, {
            "hf_efficiency_format_version": str(FORMAT_VERSION),
            "quant_method": QUANT_METHOD,
            SAVE_ID_KEY: self.next_save_id or new_save_id(),
        }

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        # the CPU kernel is a torch operator (``hf_efficiency::quant_gemm``): a static-cache decode step traces
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Nothing is weight-quantized (full fine-tuning of a model carrying only other sections), or a
        # peft section trains float parameters (adapters, biases) beside the quantized weights.
        return (
            self.quantization_config.quantization is None or getattr(self.quantization_config, "peft", None) is not None
        )

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):  # a saved config's dtype is a string
            dtype = getattr(torch, dtype)
        count = dequantize_model(model, dtype or torch.float32)
        logger.info(f"dequantized {count} QuantLinear / QuantExperts modules to {dtype}")
        return model


def _saved_experts_quantized(model, checkpoint_files) -> bool:
    """Whether a checkpoint of ours holds `QuantExperts` tensors for the model's experts. Checkpoints written
    before experts were quantized store them in float (per-expert or fused keys): those keep the float module.
    A checkpoint with neither counts as quantized, so that validation names the missing tensors."""
    family = family_of(model)
    if family is None or family.experts is None or not checkpoint_files:
        return True
    keys = checkpoint_keys(checkpoint_files)
    marker = f".{family.experts.module.rpartition('.')[2]}."  # ".experts."
    if any(f"{marker}{GATE_UP}." in k for k in keys):
        return True
    if any(marker in k for k in keys):
        logger.info("the checkpoint stores the mixture-of-experts tensors in float: they load unquantized")
        return False
    return True


def attach_quantizer(model, config: EfficiencyConfig, names: list[str]) -> None:
    """Make ``model`` (its ``names`` already `QuantLinear`) carry ``config`` and a pre-quantized
    quantizer, as transformers' ``from_pretrained`` leaves a quantized model, so that
    ``save_pretrained`` / ``push_to_hub`` write a checkpoint a plain ``from_pretrained`` reloads."""
    from transformers import PreTrainedModel

    quantizer = EfficiencyHfQuantizer(config, pre_quantized=True)
    quantizer.quantized_modules = names
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    for module in model.modules():  # as transformers' postprocess_model does
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True
