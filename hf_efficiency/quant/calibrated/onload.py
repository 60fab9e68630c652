"""Sequential onloading, the layer I/O: read a decoder layer's tensors from the safetensors shards just before the
calibrated pipeline needs them, and write it out (returning it to ``meta``) as soon as it is final.

`LayerOnloader` is the hook `quantize_calibrated` calls (``onloader=``); `CheckpointReader` reads tensors with
plain file reads (nothing memory-mapped stays resident); `ShardWriter` writes one shard per piece. The entry point,
`hf_efficiency.quantize_sequential`, lives in the integration layer (`hf_efficiency.integration.sequential`):
it builds the model skeleton and writes the config as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from ...config import FORMAT_VERSION, QUANT_METHOD

logger = logging.get_logger(__name__)

SAFE_INDEX = "model.safetensors.index.json"


class SequentialOnloadError(ValueError):
    """The model or the configuration cannot be quantized one layer at a time (the message says why)."""


# --- reading the source checkpoint ----------------------------------------------------------
class CheckpointReader:
    """Tensors of a safetensors checkpoint folder by name, read on demand with plain file reads into fresh
    tensors (`FolderTensors.read_copy`): no shard is memory-mapped, so nothing of the checkpoint stays resident
    (a mapped shard's pages count in the process's memory for as long as it is open)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from ...formats.common import FormatError
        from ...formats.folder_tensors import FolderTensors

        self.folder = os.fspath(folder)
        try:
            self.tensors = FolderTensors(self.folder)
        except FormatError as e:
            raise SequentialOnloadError(f"{e} (sequential onloading reads safetensors checkpoints)") from e

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for ``keys``, each a fresh CPU tensor."""
        self.check(keys)
        return {k: self.tensors.read_copy(k) for k in keys}

    def check(self, keys: list[str]) -> None:
        """Raise `SequentialOnloadError` naming the first of ``keys`` the checkpoint lacks (and, when the module
        holding it is stored under other names, those)."""
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            owner, stored = missing[0], []
            scope = os.path.commonprefix(keys).rpartition(".")[0]  # the module being read
            while "." in owner and not stored and owner.startswith(scope) and owner != scope:
                # the nearest module (within the one being read) holding tensors the model does not name
                owner = owner.rpartition(".")[0]
                stored = sorted(k for k in self.tensors.keys() if k.startswith(owner + ".") and k not in keys)
            if stored:  # the module is there, in another layout (e.g. one tensor per expert, legacy names)
                raise SequentialOnloadError(
                    f"the checkpoint in {self.folder} stores {owner} as tensors the model does not name "
                    f"({', '.join(stored[:3])}{', ...' if len(stored) > 3 else ''}; {len(stored)} in all) and lacks "
                    f"{missing[0]!r}: a layout transformers converts while loading, which sequential onloading does "
                    "not apply; quantize this model in memory (--onload in-memory)"
                )
            raise SequentialOnloadError(
                f"the checkpoint in {self.folder} has no tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; sequential onloading reads tensors by the model's own parameter names"
            )


# --- writing the output checkpoint -----------------------------------------------------------
class ShardWriter:
    """Writes an output checkpoint one piece at a time (every shard carries our format metadata and one save
    id); `finish` names the shards ``model-0000k-of-0000N.safetensors`` once their number is known (empty
    pieces write nothing) and writes the weight index."""

    def __init__(self, folder: str | os.PathLike, save_id: str) -> None:
        from ...saving import SAVE_ID_KEY

        self.folder = os.fspath(folder)
        self.metadata = {
            "format": "pt",
            "hf_efficiency_format_version": str(FORMAT_VERSION),
            "quant_method": QUANT_METHOD,
            SAVE_ID_KEY: save_id,
        }
        self.save_id = save_id
        self.pieces: list[list[str]] = []  # tensor names of each written shard, in order
        self.total_size = 0

    def _part(self, k: int) -> str:
        return os.path.join(self.folder, f".piece-{k:05d}.safetensors")

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the next piece (an empty one writes nothing)."""
        from safetensors.torch import save_file

        if not tensors:
            return
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, self._part(len(self.pieces)), metadata=self.metadata)
        self.pieces.append(list(tensors))
        self.total_size += sum(v.numel() * v.element_size() for v in tensors.values())

    @property
    def weight_map(self) -> dict[str, str]:
        n = len(self.pieces)
        return {k: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, keys in enumerate(self.pieces) for k in keys}

    def finish(self, total_parameters: int) -> None:
        """Name the shards and write the weight index (after the last piece)."""
        from ...saving import SAVE_ID_KEY

        n = len(self.pieces)
        for i in range(n):
            os.replace(self._part(i), os.path.join(self.folder, f"model-{i + 1:05d}-of-{n:05d}.safetensors"))
        index = {
            "metadata": {
                "total_parameters": total_parameters,
                "total_size": self.total_size,
                SAVE_ID_KEY: self.save_id,
            },
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        with open(os.path.join(self.folder, SAFE_INDEX), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --- the hook the pipeline calls ---------------------------------------------------------------
@dataclass
class LayerOnloader:
    """Materializes modules of a ``meta`` skeleton from a `CheckpointReader` when the pipeline needs them
    (`load`) and, once they are final, writes them to a `ShardWriter` and returns them to ``meta``
    (`release`). ``aliases`` maps a model key to the checkpoint key holding its tensor (an untied head reads
    the embedding matrix)."""

    reader: CheckpointReader
    writer: ShardWriter
    dtype: torch.dtype
    aliases: dict[str, str] = field(default_factory=dict)
    #: model keys whose checkpoint tensor is stored transposed (GPT-2's ``Conv1D`` weights, which the pipeline
    #: turns into ``nn.Linear``)
    transposed: set[str] = field(default_factory=set)
    #: how many tensors were written (for the report)
    tensors_written: int = 0

    def load(self, module: nn.Module, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
        """Read ``module``'s parameters and persistent buffers (named ``prefix + name`` in the model) that are
        still on ``meta`` into it, except those under the name prefixes ``exclude``. Tensors shared by several
        names (tied weights) are read once and stay shared."""
        groups = [
            names
            for names in shared_groups(module, exclude)
            if _get_tensor(module, names[0]).is_meta
            or (not is_parameter(module, names[0]) and prefix + names[0] in self.reader)  # persistent buffers
        ]
        if not groups:
            return
        keys = {names[0]: self.aliases.get(prefix + names[0], prefix + names[0]) for names in groups}
        tensors = self.reader.read(sorted(set(keys.values())))
        for names in groups:
            key = keys[names[0]]
            t = tensors[key] if list(keys.values()).count(key) > 1 else tensors.pop(key)
            if prefix + names[0] in self.transposed:
                t = t.t().contiguous()
            old = module.get_parameter(names[0]) if is_parameter(module, names[0]) else None
            t = t.to(self.dtype) if t.is_floating_point() else t
            value = nn.Parameter(t, requires_grad=old.requires_grad) if old is not None else t
            for n in names:
                _set_tensor(module, n, value)

    def release(self, pieces: list[tuple[nn.Module, str]], exclude: tuple[str, ...] = ()) -> None:
        """Write the state of every ``(module, prefix)`` (names under ``exclude`` left out, tied tensors once)
        as the next output piece, and move what was written to ``meta``."""
        state = {}
        for module, prefix in pieces:
            for names in shared_groups(module, exclude):
                state[prefix + names[0]] = _get_tensor(module, names[0])
        self.writer.write(state)
        self.tensors_written += len(state)
        for module, _ in pieces:
            for names in shared_groups(module, exclude):
                t = _get_tensor(module, names[0])
                meta = t.to("meta")
                value = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
                for n in names:
                    _set_tensor(module, n, value)
            for sub in module.modules():  # derived layouts (QuantLinear's kernel cache) go with the tensors
                if hasattr(sub, "invalidate_kernel_cache"):
                    sub.invalidate_kernel_cache()


def shared_groups(module: nn.Module, exclude: tuple[str, ...]) -> list[list[str]]:
    """Names of ``module``'s parameters and persistent buffers grouped by tensor (tied weights share one group,
    the first name in model order leads), skipping names under ``exclude``."""
    groups: dict[int, list[str]] = {}
    for n, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or any(n == e or n.startswith(e + ".") for e in exclude):
            continue
        groups.setdefault(id(t), []).append(n)
    return list(groups.values())


def is_parameter(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(owner)._parameters


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    return sub._parameters[leaf] if leaf in sub._parameters else sub._buffers[leaf]


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    if leaf in sub._parameters:
        sub._parameters[leaf] = value
    else:
        sub._buffers[leaf] = value
