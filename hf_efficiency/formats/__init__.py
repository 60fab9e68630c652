"""Readers of community compressed checkpoints into our quantized modules, keeping their bits.

* GGUF files (:mod:`.gguf`): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K ... Q6_K, exactly;
* GPTQ and AWQ folders (:mod:`.gptq`) and compressed-tensors ``pack-quantized`` folders
  (:mod:`.compressed_tensors`), without gptqmodel / autoawq / llm-compressor.

Entry points: :func:`load_compressed` (any of them), :func:`load_gguf`, and
``from_pretrained(..., efficiency_config=EfficiencyConfig(keep_compressed=True))`` (with ``gguf_file=``
for GGUF). The model is built through our pre-quantized loading path, so ``save_pretrained`` writes
our safetensors format and a plain ``from_pretrained`` reloads it (``hf-efficiency convert``).
"""

from __future__ import annotations

import os
from typing import Any

from .common import FormatError
from .gguf import gguf_tokenizer, is_gguf, load_gguf, read_gguf

FOLDER_FORMATS = ("gptq", "awq", "compressed-tensors")


def detect_format(path: str | os.PathLike, gguf_file: str | None = None) -> str | None:
    """``"gguf"`` for a GGUF file (or a folder with ``gguf_file``), the ``quant_method`` of a GPTQ / AWQ /
    compressed-tensors folder, else ``None``."""
    if gguf_file is not None or is_gguf(path):
        return "gguf"
    if os.path.isdir(path):
        from .folders import detect_folder_format

        return detect_folder_format(path)
    return None


def load_compressed(
    path: str | os.PathLike, gguf_file: str | None = None, *, model_class=None, **from_pretrained_kwargs: Any
):
    """Load a community compressed checkpoint (GGUF file, or GPTQ / AWQ / compressed-tensors folder) into
    our quantized modules. Keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map`` ...);
    GGUF also takes ``scale_dtype`` and ``unsupported`` (see :func:`read_gguf`)."""
    if not os.path.exists(path):
        raise FormatError(
            f"{path}: no such local file or folder; keep_compressed reads local checkpoints (download a Hub "
            "repository first, e.g. with huggingface_hub.snapshot_download)"
        )
    kind = detect_format(path, gguf_file)
    if kind == "gguf":
        return load_gguf(path, gguf_file, model_class=model_class, **from_pretrained_kwargs)
    if kind is None:
        if os.path.isdir(path):
            from .folders import folder_quantization_config

            folder_quantization_config(path)  # a corrupt config.json: say so rather than "not a folder of ..."
        raise FormatError(
            f"{path}: not a GGUF file nor a folder whose config.json has a quantization_config with quant_method "
            f"in {', '.join(FOLDER_FORMATS)}; keep_compressed=True loads only those"
        )
    from .folders import load_folder

    return load_folder(path, model_class=model_class, **from_pretrained_kwargs)


__all__ = [
    "FOLDER_FORMATS",
    "FormatError",
    "detect_format",
    "gguf_tokenizer",
    "load_compressed",
    "load_gguf",
    "read_gguf",
]
