"""What the folder readers (GPTQ, AWQ, compressed-tensors) need from a checkpoint folder: its
tensors, read one at a time, and the linear layers of the model the checkpoint is for.

A folder holds either one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor: file}}``). Every file's header is read and checked up front (a truncated
or corrupt file raises `FormatError` naming it before anything is loaded); tensor data is read
lazily, tensor by tensor, with ``safetensors.safe_open``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import logging

from .common import FormatError, meta_model
from .safetensors_header import CheckpointError, read_header, read_index

logger = logging.get_logger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class FolderTensors:
    """The tensors of a checkpoint folder: names, header dtypes and shapes without reading data, and
    ``get(name)`` reading one tensor."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.fspath(folder)
        self._file_of: dict[str, str] = {}
        self._entries: dict[str, dict] = {}
        self._handles: dict[str, object] = {}
        self._data_start: dict[str, int] = {}
        weight_map = self._weight_map()
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        for file in files:
            path = os.path.join(self.folder, file)
            if not os.path.isfile(path):
                raise FormatError(f"{path}: shard listed in {INDEX_FILE} is missing")
            try:
                header = read_header(path)
            except CheckpointError as exc:
                raise FormatError(str(exc)) from exc
            with open(path, "rb") as fh:  # the header was checked: its length is valid
                self._data_start[file] = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, entry in header.items():
                if name in self._file_of:
                    raise FormatError(
                        f"{self.folder}: tensor {name!r} is in both {self._file_of[name]} and {file}; "
                        "a checkpoint holds each tensor once"
                    )
                self._file_of[name] = file
                self._entries[name] = entry
        if weight_map is not None:
            # a stale index (a tensor listed in another shard, or not at all) is common on the Hub and harmless:
            # every tensor is read from the file that holds it, and the readers check what the model needs
            stale = sorted(n for n in set(weight_map) | set(self._file_of) if weight_map.get(n) != self._file_of.get(n))
            if stale:
                logger.warning(
                    f"{os.path.join(self.folder, INDEX_FILE)}: weight_map disagrees with the shards for {len(stale)} "
                    f"tensor(s) ({', '.join(stale[:4])}); the tensors are read from the files that hold them"
                )

    def _weight_map(self) -> dict[str, str] | None:
        """The index's ``weight_map`` (``None``: a single ``model.safetensors``)."""
        index = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(index):
            try:
                return read_index(index)
            except CheckpointError as exc:
                raise FormatError(str(exc)) from exc
        if os.path.isfile(os.path.join(self.folder, SINGLE_FILE)):
            return None
        others = sorted(f for f in os.listdir(self.folder) if f.endswith((".bin", ".pt", ".pth")))
        hint = f" (found {', '.join(others)}: only safetensors checkpoints are read)" if others else ""
        raise FormatError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def file_of(self, name: str) -> str:
        """The file (relative to the folder) holding ``name``."""
        return self._file_of[name]

    def where(self, name: str) -> str:
        """``'name' in file`` for error messages."""
        return f"tensor {name!r} in {self._file_of.get(name, '?')}"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return _DTYPES.get(self._entries[name]["dtype"])

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string (``"I32"``, ``"F16"`` ...)."""
        return self._entries[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (raises `FormatError` naming the file when it cannot be read)."""
        if name not in self._entries:
            raise FormatError(f"{self.folder}: tensor {name!r} is missing")
        file = self._file_of[name]
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(os.path.join(self.folder, file), framework="pt")
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise FormatError(f"{os.path.join(self.folder, file)}: cannot read tensor {name!r} ({exc})") from exc

    def read_copy(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read with plain file reads into a fresh tensor: the file is never memory-mapped, so
        nothing but the tensor itself becomes resident (`get` maps the shard: every page read stays in the
        process's resident set while the handle is open)."""
        if name not in self._entries:
            raise FormatError(f"{self.folder}: tensor {name!r} is missing")
        entry, file = self._entries[name], self._file_of[name]
        dtype = self.dtype(name)
        if dtype is None:
            raise FormatError(f"{self.folder}: {self.where(name)} has dtype {entry['dtype']}, which torch cannot hold")
        start, end = entry["data_offsets"]
        out = torch.empty(self.shape(name), dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        path = os.path.join(self.folder, file)
        with open(path, "rb", buffering=0) as fh:
            fh.seek(self._data_start[file] + start)
            done = 0
            while done < end - start:
                got = fh.readinto(view[done:])
                if not got:
                    raise FormatError(f"{path}: file ends inside tensor {name!r}")
                done += got
        return out

    def close(self) -> None:
        self._handles.clear()


def model_linears(model_config, model_class=None, tensors: FolderTensors | None = None) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` of the model ``model_config`` describes (built on the meta device, so
    nothing is allocated); ``model_class`` as in `load_model` (default ``AutoModelForCausalLM``). With
    ``tensors`` (the folder's), a config claiming more layers than the folder has tensors is refused first."""
    source = "config.json" if tensors is None else os.path.join(tensors.folder, "config.json")
    model = meta_model(model_config, model_class, source=source, n_tensors=None if tensors is None else len(tensors))
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def expect(
    tensors: FolderTensors, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], what: str = ""
) -> None:
    """Raise `FormatError` unless tensor ``name`` exists with ``shape`` and one of ``dtypes``."""
    if name not in tensors:
        raise FormatError(f"{tensors.folder}: tensor {name!r} is missing{what}")
    got = tensors.shape(name)
    if tuple(got) != tuple(shape):
        raise FormatError(
            f"{tensors.folder}: {tensors.where(name)} has shape {list(got)}, expected {list(shape)}{what}"
        )
    if tensors.dtype(name) not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise FormatError(
            f"{tensors.folder}: {tensors.where(name)} has dtype {tensors.dtype_name(name)}, expected {allowed}{what}"
        )
