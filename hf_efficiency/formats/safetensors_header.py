"""Reading a safetensors header without the tensor data, with checks that name the file.

Shared by the checkpoint checks of the integration layer and by the community-format readers.
"""

from __future__ import annotations

import json
import os
import struct


class CheckpointError(ValueError):
    """A checkpoint of ours is missing a tensor, has a wrong shape/dtype, or is corrupt."""


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor entries ``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file,
    after checking that the file is long enough to hold every tensor."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes; no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: file is truncated (header of {n} bytes, file of {size} bytes)")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        missing = 8 + n + end - size
        last = max(header, key=lambda k: header[k]["data_offsets"][1])
        raise CheckpointError(
            f"{path}: file is truncated: {missing} bytes missing (tensor {last!r} and possibly others "
            "extend past the end); re-download or re-save the checkpoint"
        )
    return header


__all__ = ["CheckpointError", "read_header"]
