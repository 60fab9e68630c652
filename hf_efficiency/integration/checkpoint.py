"""Validation of a pre-quantized checkpoint before transformers loads it.

transformers silently re-initializes missing tensors and only logs unexpected ones; for packed
weights that would be garbage. We read the safetensors headers (no tensor data) and check every
tensor a `QuantLinear` needs (the per-expert ones of a `QuantExperts` included): present, right shape,
right dtype, file not truncated. Checkpoint keys are read through the model's weight renamings (transformers
saves Mixtral's ``mlp`` as ``block_sparse_moe``), as ``from_pretrained`` reads them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

from torch import nn

from ..formats.safetensors_header import CheckpointError, read_header, read_index
from ..quant.modules.linear import QuantLinear

__all__ = [
    "CheckpointError",
    "check_loaded_values",
    "check_local_folder",
    "check_save_ids",
    "checkpoint_keys",
    "expected_tensors",
    "read_header",
    "validate_checkpoint",
]

_DTYPE_NAMES = {
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.uint8": "U8",
    "torch.int8": "I8",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float32": "F32",
}


def expected_tensors(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{checkpoint key: (dtype name, shape)}`` for every tensor of the model's QuantLinears whose dtype is part
    of the format (`QuantLinear.storage_dtypes`: all but the bias)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for attr, dtype in module.storage_dtypes().items():
                shape = tuple(getattr(module, attr).shape)
                out[f"{name}.{attr}"] = (_DTYPE_NAMES.get(str(dtype), str(dtype)), shape)
    return out


def checkpoint_keys(checkpoint_files: Iterable[str | os.PathLike]) -> set[str]:
    """Every tensor key in the headers of the safetensors ``checkpoint_files`` (other files are skipped)."""
    keys: set[str] = set()
    for path in checkpoint_files:
        if os.fspath(path).endswith(".safetensors"):
            keys.update(read_header(path))
    return keys


def _renamer(model: nn.Module):
    """Key -> the model's name for it, through the model's registered weight renamings (no converters)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # noqa: BLE001 - a model transformers has no mapping machinery for: keys as saved
        return lambda key: key
    return lambda key: apply_renamings(key, renamings) if renamings else key


def validate_checkpoint(model: nn.Module, checkpoint_files: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Raise `CheckpointError` naming the first problem; when all is well return ``{tensor key: file}`` for
    the tensors of the model's QuantLinears (for `check_loaded_values` to name the file of a bad value)."""
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    rename = _renamer(model)
    for path in checkpoint_files:
        if not os.fspath(path).endswith(".safetensors"):
            raise CheckpointError(f"{path}: hf-efficiency checkpoints are safetensors only")
        for key, entry in read_header(path).items():
            found[rename(key)] = (entry["dtype"], tuple(entry["shape"]), os.fspath(path))
    for key, (dtype, shape) in expected_tensors(model).items():
        if key not in found:
            raise CheckpointError(
                f"checkpoint is missing tensor {key!r} (expected {dtype} {list(shape)}); the checkpoint is "
                "incomplete or was not written by hf-efficiency with this quantization config"
            )
        got_dtype, got_shape, path = found[key]
        if got_shape != shape:
            raise CheckpointError(
                f"tensor {key!r} in {os.path.basename(path)} has shape {list(got_shape)}, expected {list(shape)} "
                "for the quantization config in config.json"
            )
        if got_dtype != dtype:
            raise CheckpointError(f"tensor {key!r} in {os.path.basename(path)} has dtype {got_dtype}, expected {dtype}")
    return {key: path for key, (_, _, path) in found.items()}


def check_local_folder(path: str | os.PathLike | None, gguf_file: str | None = None) -> None:
    """Checks of a local model folder before transformers reads it, for errors it would report unclearly: a folder
    holding only GGUF files given without ``gguf_file=`` (transformers: "Unrecognized model ... model_type"), and a
    weight index that is empty or not JSON (a bare ``JSONDecodeError``). Anything else passes unchanged."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        return
    entries = sorted(os.listdir(folder))
    ggufs = [e for e in entries if e.endswith(".gguf")]
    if gguf_file is None and ggufs and "config.json" not in entries:
        raise CheckpointError(
            f"{folder} holds GGUF file(s) ({', '.join(ggufs[:4])}) and no config.json: pass gguf_file={ggufs[0]!r} "
            f"to from_pretrained (the convert and export commands: --gguf-file {ggufs[0]})"
        )
    for entry in entries:
        if entry.endswith(".safetensors.index.json"):
            index_path = os.path.join(folder, entry)
            weight_map = read_index(index_path)
            missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(folder, v))})
            if missing:
                raise CheckpointError(
                    f"{index_path} names shard(s) that are not in the folder: {', '.join(missing[:4])}; the save is "
                    "incomplete: re-download or re-save the model"
                )


def _header_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (``{}`` when absent); the header was checked by `read_header`."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        try:
            meta = json.loads(fh.read(n)).get("__metadata__")
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors header ({exc})") from exc
    return meta if isinstance(meta, dict) else {}


def check_save_ids(checkpoint_files: Iterable[str | os.PathLike]) -> None:
    """Raise `CheckpointError` when the shards (and the weight index beside them) come from different saves:
    every file written by `save_pretrained` since format version 5 carries the save's id. Files without an id
    (earlier saves, other writers) are accepted alone, never mixed with files that have one."""
    from ..saving import SAVE_ID_KEY

    files = [os.fspath(p) for p in checkpoint_files if os.fspath(p).endswith(".safetensors")]
    if not files:
        return
    ids: dict[str, str | None] = {}
    for path in files:
        ids[path] = _header_metadata(path).get(SAVE_ID_KEY)
    folder = os.path.dirname(files[0])
    names = {os.path.basename(p) for p in files}
    for entry in sorted(os.listdir(folder)) if len(files) > 1 else ():
        if entry.endswith(".safetensors.index.json"):
            index_path = os.path.join(folder, entry)
            try:
                with open(index_path, encoding="utf-8") as fh:
                    index = json.load(fh)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{index_path}: not a valid weight index ({exc})") from exc
            if not isinstance(index, dict) or not names <= set((index.get("weight_map") or {}).values()):
                continue
            ids[index_path] = (index.get("metadata") or {}).get(SAVE_ID_KEY)
    distinct = set(ids.values())
    if len(distinct) > 1:
        by_id: dict[str | None, list[str]] = {}
        for path, save_id in ids.items():
            by_id.setdefault(save_id, []).append(os.path.basename(path))
        groups = "; ".join(
            f"{', '.join(sorted(paths))}: {'no save id' if sid is None else 'save ' + sid[:12]}"
            for sid, paths in sorted(by_id.items(), key=lambda kv: str(kv[0]))
        )
        raise CheckpointError(
            f"{folder}: the weight files come from different saves ({groups}); a save was interrupted or files of "
            "two saves were copied together. Save the model again into an empty folder"
        )


def check_loaded_values(model: nn.Module, files: dict[str, str] | None = None) -> None:
    """Check the loaded values of every QuantLinear (`QuantLinear.check_values`: scales, minima and kept outlier
    values finite, indices and zero points in range); raise `CheckpointError` naming the tensor and, when
    ``files`` (from `validate_checkpoint`) knows it, the file."""
    files = files or {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        try:
            module.check_values()
        except ValueError as exc:
            tensor = str(exc).split(":", 1)[0]
            key = f"{name}.{tensor}"
            where = f" in {os.path.basename(files[key])}" if key in files else ""
            raise CheckpointError(
                f"tensor {key!r}{where}: {str(exc).split(':', 1)[-1].strip()}; the checkpoint is corrupt "
                "(re-download or re-save it)"
            ) from exc
