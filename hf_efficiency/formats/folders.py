"""Loading GPTQ, AWQ and compressed-tensors checkpoint folders into our quantized modules.

:func:`detect_folder_format` names the format from ``config.json``'s ``quantization_config``;
:func:`load_folder` reads the folder with the matching reader (:mod:`.gptq`,
:mod:`.compressed_tensors`) and builds the model through transformers' ``from_pretrained``
(:func:`.common.load_model`), so the result saves, reloads and runs like any model of ours.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .common import FormatError, efficiency_config_for, load_model
from .compressed_tensors import read_compressed_tensors
from .gptq import read_awq, read_gptq
from .safetensors_header import CheckpointError, parse_json

READERS: dict[str, Callable] = {
    "gptq": read_gptq,
    "awq": read_awq,
    "compressed-tensors": read_compressed_tensors,
}
SUPPORTED_METHODS = tuple(READERS)
#: a config.json is a few kilobytes; anything this large is not one
MAX_CONFIG_BYTES = 16_000_000


def folder_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (or older compressed-tensors' ``compression_config``)
    of a folder; ``None`` when the folder has no config.json or no such section."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"{file}: cannot read the config ({exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise FormatError(f"{file}: larger than {MAX_CONFIG_BYTES} bytes: not a model config")
    try:
        data = parse_json(raw, file, "JSON config", allow_constants=True)  # as transformers reads it
    except CheckpointError as exc:
        raise FormatError(str(exc)) from None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if qc is None and isinstance(data, dict):
        qc = data.get("compression_config")
    return qc if isinstance(qc, dict) else None


def _method(qc: dict[str, Any] | None) -> str | None:
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method is None and ("config_groups" in qc or "quantization_config" in qc):
        method = "compressed-tensors"  # compressed-tensors' older compression_config has no quant_method
    return str(method).lower() if method is not None else None


def detect_folder_format(path: str | os.PathLike) -> str | None:
    """``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` for a folder whose config.json names that
    ``quant_method``; ``None`` otherwise (no config, no quantization, another method)."""
    if not os.path.isdir(os.fspath(path)):
        return None
    try:
        method = _method(folder_quantization_config(path))
    except FormatError:
        return None
    return method if method in READERS else None


def read_folder(path: str | os.PathLike, config=None, model_class=None):
    """``(config, state_dict, formats, float_linears)``: the folder's config (its foreign
    ``quantization_config`` removed) and the reader's result."""
    from transformers import AutoConfig

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FormatError(f"{path}: not a folder (GPTQ / AWQ / compressed-tensors checkpoints are read from folders)")
    qc = folder_quantization_config(path)
    method = _method(qc)
    if method not in READERS:
        found = "no quantization_config" if qc is None else f"quant_method {method!r}"
        raise FormatError(
            f"{path}/config.json: {found} is not a supported checkpoint format; supported quant_method: "
            f"{', '.join(SUPPORTED_METHODS)}"
        )
    if config is None:
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - transformers raises anything on a config it cannot interpret
            raise FormatError(
                f"{path}/config.json: transformers cannot read the model config ({type(exc).__name__}: "
                f"{str(exc)[:300]})"
            ) from exc
    for attr in ("quantization_config", "compression_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    state_dict, formats, float_linears = READERS[method](path, qc, config, model_class=model_class)
    return config, state_dict, formats, float_linears


def load_folder(path: str | os.PathLike, model_class=None, **from_pretrained_kwargs: Any):
    """The model stored in a GPTQ, AWQ or compressed-tensors folder, with our `QuantLinear` modules
    holding its weights exactly (see the readers for the layouts and the storage cost).

    ``model_class``: the class (or Auto class, default ``AutoModelForCausalLM``) to build; other
    keyword arguments (``dtype``, ``device_map`` ...) go to ``from_pretrained``. Raises `FormatError`
    for anything the readers cannot reproduce exactly, naming the tensor and file.
    """
    config, state_dict, formats, float_linears = read_folder(path, model_class=model_class)
    qcfg = efficiency_config_for(formats, float_linears)
    return load_model(
        config, state_dict, qcfg, source=os.fspath(path), model_class=model_class, **from_pretrained_kwargs
    )
