"""Validation of a pre-quantized checkpoint before transformers loads it.

transformers silently re-initializes missing tensors and only logs unexpected ones; for packed
weights that would be garbage. We read the safetensors headers (no tensor data) and check every
tensor a `QuantLinear` needs (the per-expert ones of a `QuantExperts` included): present, right shape,
right dtype, file not truncated. Checkpoint keys are read through the model's weight renamings (transformers
saves Mixtral's ``mlp`` as ``block_sparse_moe``), as ``from_pretrained`` reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from torch import nn

from ..formats.safetensors_header import CheckpointError, read_header
from ..quant.modules.linear import QuantLinear

__all__ = ["CheckpointError", "checkpoint_keys", "expected_tensors", "read_header", "validate_checkpoint"]

_DTYPE_NAMES = {
    "torch.int32": "I32",
    "torch.uint8": "U8",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float32": "F32",
}


def expected_tensors(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{checkpoint key: (dtype name, shape)}`` for every packed tensor of the model's QuantLinears."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for attr in ("weight", "weight_scale", "weight_min", "weight_zero", "weight_perm"):
                t = getattr(module, attr)
                if t is not None:
                    out[f"{name}.{attr}"] = (_DTYPE_NAMES.get(str(t.dtype), str(t.dtype)), tuple(t.shape))
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


def validate_checkpoint(model: nn.Module, checkpoint_files: Iterable[str | os.PathLike]) -> None:
    """Raise `CheckpointError` naming the first problem; return silently when all is well."""
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
