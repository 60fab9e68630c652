"""``quantize_sequential``: calibrated quantization of a model larger than memory, one decoder layer at a time.

It never holds the float model: it builds the model's skeleton on the ``meta`` device, and the calibrated pipeline
(`quantize_calibrated`) with a `LayerOnloader` reads one decoder layer at a time from the safetensors shards,
calibrates and quantizes it, writes the quantized layer to its own output shard and returns the layer to ``meta``
before the next is read. Peak memory: runtime + the input embedding (for the first pass only) + about two layers
(the float layer, its quantized copy and the method's working memory, e.g. GPTQ's Hessians) + the calibration
activations. The folder written holds, key for key and bit for bit, what the in-memory pipeline's
``save_pretrained`` writes (tested), so plain ``from_pretrained`` loads it.

Not streamed: rotations (they rotate every weight before the first layer is quantized) and automatic mixed
precision (``target_bits`` measures every module on a forward of the whole float model): both raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import CalibrationSpec, EfficiencyConfig
from ..quant.calibrated.onload import (
    CheckpointReader,
    LayerOnloader,
    SequentialOnloadError,
    ShardWriter,
    is_parameter,
    shared_groups,
)

logger = logging.get_logger(__name__)

#: files of a source folder ``quantize_sequential`` needs (a Hub snapshot downloads only these)
SOURCE_PATTERNS = ("*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*")


# --- the entry point ----------------------------------------------------------------------------
@dataclass
class SequentialReport:
    """What `quantize_sequential` did."""

    out_dir: str
    #: the local folder the float checkpoint was read from (a Hub id's cache snapshot)
    source: str
    seconds: float
    calibration_tokens: int
    shards: int
    tensors: int
    pipeline: Any = None
    #: the model skeleton after the run: every tensor on ``meta`` (shapes and dtypes of the saved checkpoint),
    #: its config carrying the applied quantization config (for model cards and byte counts)
    model: nn.Module | None = None


def resolve_source(model: str | os.PathLike, cache_dir: str | None = None, revision: str | None = None) -> str:
    """A local folder for ``model``: the folder itself, or the Hub cache snapshot of a repo id (downloading only
    configs, tokenizer files and safetensors shards when the Hub is reachable; offline, the cached snapshot)."""
    if os.path.isdir(model):
        return os.fspath(model)
    from huggingface_hub import snapshot_download

    return snapshot_download(
        os.fspath(model), revision=revision, cache_dir=cache_dir, allow_patterns=list(SOURCE_PATTERNS)
    )


def build_skeleton(folder: str, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder``'s config.json with every parameter on ``meta`` (buffers computed at
    construction, e.g. rotary frequencies, are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained leaves it: a tied head shares the embedding's parameter
    model.config._name_or_path = folder
    if model.can_generate() and os.path.isfile(os.path.join(folder, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)  # as from_pretrained reads it
    model.eval()
    return model


def source_dtype(dtype: torch.dtype | str, folder: str) -> torch.dtype:
    """``dtype`` as a torch dtype, as the memory estimator reads it (`resolve_dtype`; ``"auto"``: the dtype of
    ``folder``'s config.json, float32 when it names none)."""
    from transformers import AutoConfig

    from ..memory.scenarios import resolve_dtype

    return resolve_dtype(dtype, AutoConfig.from_pretrained(folder) if dtype == "auto" else None)


def check_source(model: nn.Module, reader: CheckpointReader, aliases: dict[str, str], skip_prefixes=()) -> None:
    """Raise `SequentialOnloadError` before any work when the checkpoint lacks a tensor the model will read
    (renamed keys, per-expert mixture-of-experts layouts): from the headers alone."""
    keys = sorted(
        {
            aliases.get(names[0], names[0])
            for names in shared_groups(model, tuple(skip_prefixes))
            if is_parameter(model, names[0])
        }
    )
    reader.check(keys)


def check_streamable(config: EfficiencyConfig) -> None:
    """Raise `SequentialOnloadError` for what cannot be quantized one layer at a time."""
    spec = config.quantization
    if spec is None:
        raise SequentialOnloadError("sequential onloading quantizes: the config has no quantization section")
    if spec.rotation is not None:
        raise SequentialOnloadError(
            f"quantization.rotation={spec.rotation!r} rotates every weight of the model before the first layer is "
            "quantized; it cannot run one layer at a time (quantize in memory, or without rotation)"
        )
    if spec.target_bits is not None:
        raise SequentialOnloadError(
            "quantization.target_bits measures every module's sensitivity on a forward pass of the whole float "
            "model; it cannot run one layer at a time (give module_bits explicitly instead)"
        )
    if config.peft is not None:
        raise SequentialOnloadError("a peft section cannot be applied while quantizing one layer at a time")


def quantize_sequential(
    model: str | os.PathLike,
    efficiency_config: EfficiencyConfig | dict,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    tokenizer: Any = None,
    progress: bool = True,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> SequentialReport:
    """Quantize ``model`` (a local folder or Hub id with safetensors shards) with the calibrated pipeline one
    decoder layer at a time and write the quantized checkpoint (config + shards + index) to ``out_dir``,
    through a staging folder (`hf_efficiency.saving`). The result is the in-memory pipeline's
    ``save_pretrained`` output bit for bit; ``from_pretrained(out_dir)`` loads it.

    Args:
        model: folder or Hub id of a float checkpoint in safetensors.
        efficiency_config: the `EfficiencyConfig` (or its dict) with a calibrated or plain quantization section.
        out_dir: the folder to write (replaced atomically: an earlier save's weight files are removed).
        dtype: the float dtype the layers are read and computed in, as ``from_pretrained(dtype=...)``: a torch
            dtype, its name, or ``"auto"`` (the checkpoint's); default float32 (what the command line uses).
        tokenizer: the calibration tokenizer (default: ``calibration.tokenizer``, else the model's own).
        progress: show a progress bar over the layers.
        cache_dir: for a Hub id, the cache holding its snapshot (default: the Hub cache).
        revision: for a Hub id, the revision of its snapshot (default: main).
    """
    import time

    from transformers import AutoTokenizer

    from ..data import base_model_of
    from ..memory.measure import pin_mmap_threshold
    from ..quant.calibrated.pipeline import quantize_calibrated
    from ..quant.modules.replace import modules_to_not_convert, tied_head_name, untie_output_embedding
    from ..saving import new_save_id, staged_save

    # glibc raises its mmap threshold as large blocks are freed, after which freed layers stay in the heap;
    # pinned, every layer's memory goes back to the system when the layer returns to meta
    pin_mmap_threshold()
    start = time.perf_counter()
    config = (
        EfficiencyConfig(**efficiency_config.to_dict())
        if isinstance(efficiency_config, EfficiencyConfig)
        else EfficiencyConfig(**efficiency_config)
    )
    check_streamable(config)
    folder = resolve_source(model, cache_dir, revision)
    reader = CheckpointReader(folder)
    dtype = source_dtype(dtype, folder)
    skeleton = build_skeleton(folder, dtype)
    skip = modules_to_not_convert(skeleton, config.quantization)
    aliases = {}
    head = tied_head_name(skeleton, skip)
    if head is not None:  # as the quantizer does: the head gets its own copy of the embedding matrix
        embedding_key = _parameter_name(skeleton, skeleton.get_input_embeddings().weight)
        untie_output_embedding(skeleton, head, copy=True)
        aliases[f"{head}.weight"] = embedding_key
        logger.info(f"{head} is untied from the input embeddings: it is quantized with the other linears")
    check_source(skeleton, reader, aliases)
    if tokenizer is None and config.needs_calibration:
        source = (config.calibration.tokenizer if config.calibration is not None else None) or folder
        tokenizer = AutoTokenizer.from_pretrained(source)

    save_id = new_save_id()
    out_dir = os.fspath(out_dir)
    with staged_save(out_dir) as staging:
        writer = ShardWriter(staging, save_id=save_id)
        onloader = LayerOnloader(reader, writer, dtype, aliases)
        applied, pipeline_report = quantize_calibrated(skeleton, config, tokenizer, skip, progress, onloader=onloader)
        writer.finish(skeleton.num_parameters())  # as save_pretrained counts them: the quantized model's
        applied.base_model = applied.base_model or base_model_of(folder)
        _save_config(skeleton, applied, staging)
    return SequentialReport(
        out_dir=os.path.abspath(out_dir),
        source=folder,
        seconds=time.perf_counter() - start,
        calibration_tokens=pipeline_report.calibration_tokens,
        shards=len(set(writer.weight_map.values())),
        tensors=onloader.tensors_written,
        pipeline=pipeline_report,
        model=skeleton,
    )


def in_memory_bytes(model: str | os.PathLike, config: EfficiencyConfig, dtype: torch.dtype = torch.float32) -> int:
    """Our estimate (`hf_efficiency.estimate_memory`) of the memory the in-memory pipeline needs for ``model``:
    the float model in ``dtype`` running one calibration batch on CPU."""
    from ..memory import estimate_memory

    cal = config.calibration or CalibrationSpec()
    return estimate_memory(
        os.fspath(model),
        mode="inference",
        dtype=str(dtype).split(".")[1],
        batch_size=cal.batch_size,
        sequence_length=cal.sequence_length,
        device="cpu",
    ).total


def should_onload(
    model: str | os.PathLike,
    config: EfficiencyConfig,
    dtype: torch.dtype = torch.float32,
    available: int | None = None,
) -> bool:
    """Whether to quantize ``model`` one layer at a time: when the configuration calibrates (data-free methods
    never hold the float model), the in-memory pipeline would not fit in the ``available`` memory (default:
    what the system reports available now), and both the configuration (`check_streamable`) and the checkpoint
    (`check_source`) can be streamed; otherwise the in-memory pipeline runs, with a warning when it may not
    fit."""
    if not config.needs_calibration:
        return False  # data-free methods quantize each tensor as it loads: the float model is never held
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = in_memory_bytes(model, config, dtype)
    if need <= available:
        return False
    try:
        check_streamable(config)
        folder = resolve_source(model)
        skeleton = build_skeleton(folder, source_dtype(dtype, folder))
        check_source(skeleton, CheckpointReader(folder), {})
    except SequentialOnloadError as e:
        logger.warning(
            f"the float model needs about {need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available, "
            f"but it cannot be quantized one layer at a time ({e}); quantizing in memory"
        )
        return False
    logger.info(
        f"the float model needs about {need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available: "
        "quantizing one decoder layer at a time (sequential onloading)"
    )
    return True


def _parameter_name(model: nn.Module, tensor: torch.Tensor) -> str:
    for n, p in model.named_parameters(remove_duplicate=False):
        if p is tensor:
            return n
    raise SequentialOnloadError("the input embedding matrix is not a parameter of the model")


def _save_config(model: nn.Module, config: EfficiencyConfig, folder: str) -> None:
    """config.json (with the applied quantization config) and generation_config.json, as ``save_pretrained``
    writes them."""
    from .quantizer import attach_quantizer

    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    attach_quantizer(model, config, [])
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
