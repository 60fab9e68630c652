"""Reading a safetensors header without the tensor data, with checks that name the file.

Shared by the checkpoint checks of the integration layer and by the community-format readers.
:func:`read_header` accepts exactly the files ``safetensors`` itself loads (and refuses duplicate
tensor names, which ``safetensors`` silently resolves to the last one): every problem is a
`CheckpointError` naming the file and, where there is one, the tensor, raised before anything of the
size the header claims is allocated. :func:`read_index` does the same for a
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint of ours is missing a tensor, has a wrong shape/dtype, or is corrupt."""


#: safetensors' own limit on the JSON header (larger headers are refused by the library)
MAX_HEADER_BYTES = 100_000_000
#: bits per element of every dtype safetensors knows
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
#: the keys every tensor entry has (safetensors ignores others)
ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (a corrupt header can hold megabytes in one value)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800"), which safetensors refuses
        return False
    return True


def _no_constant(token: str) -> Any:
    raise CheckpointError(f"{token} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise CheckpointError(f"number {text[:40]} is out of range")
    return value


#: serde_json's nesting limit (safetensors parses headers with it)
MAX_JSON_DEPTH = 127


def _check_strict(doc: Any) -> None:
    """What serde_json refuses and Python's json accepts: nesting deeper than 127 and lone surrogates."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not _utf8(value):
                raise CheckpointError(f"string {_short(value)} is not valid UTF-8")
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise CheckpointError(f"nested deeper than {MAX_JSON_DEPTH}")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not _utf8(key):
                    raise CheckpointError(f"key {_short(key)} is not valid UTF-8")
                stack.append((item, depth + 1))


def parse_json(raw: bytes, path: str, what: str, *, allow_constants: bool = False) -> Any:
    """``raw`` parsed as UTF-8 JSON without duplicate object keys and, unless ``allow_constants``, as strictly
    as safetensors' parser (serde_json) reads it: no ``NaN``/``Infinity``, no number overflowing a float, no
    lone surrogate escape, at most 127 levels of nesting. Any failure (including
    nesting too deep for Python's parser and integers too long to convert) is a `CheckpointError` naming
    ``path`` and ``what`` the file should be."""
    try:
        if allow_constants:
            return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        doc = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float
        )
        _check_strict(doc)
        return doc
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: not a valid {what} ({exc})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{path}: not a valid {what} ({type(exc).__name__}: {reason})") from None


def tensor_bits(shape: list[int], dtype: str, limit: int) -> int | None:
    """Bits a tensor of ``shape`` and ``dtype`` holds, or ``None`` when that is more than ``limit`` bits
    (never multiplies numbers beyond ``limit``: a claimed shape of 2**40 x 2**40 elements costs nothing, and a
    header of a million huge dimensions no quadratic big-integer arithmetic)."""
    if any(d == 0 for d in shape):
        return 0
    total = DTYPE_BITS[dtype]
    for d in shape:
        total *= d
        if total > limit:
            return None
    return total


def _check_entry(path: str, name: str, entry: Any) -> tuple[int, int]:
    where = f"{path}: tensor {_short(name)}"
    if not _utf8(name):
        raise CheckpointError(f"{path}: a tensor name is not valid UTF-8 ({_short(name)})")
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{where}: header entry must be an object with {', '.join(ENTRY_KEYS)}, got {_short(entry)}"
        )
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {_short(dtype)}; safetensors dtypes: {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**64 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_short(offsets)}"
        )
    begin, end = offsets
    held = end - begin
    bits = tensor_bits(shape, dtype, 2**70)
    if bits is None or bits != 8 * held:
        if bits is None:
            needs = "more than 2**64 bytes"
        elif bits % 8:
            needs = f"a fractional number of bytes ({bits} bits)"
        else:
            needs = f"{bits // 8} bytes"
        raise CheckpointError(
            f"{where}: shape {_short(shape)} of {dtype} needs {needs} but its data_offsets [{begin}, {end}] hold {held} "
            "bytes; the header is corrupt (re-download or re-save the checkpoint)"
        )
    return begin, end


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor entries ``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file.

    Checked before returning, each failure a `CheckpointError` naming the file (and the tensor):
    the header length and JSON; every entry's dtype, shape and offsets; that every tensor's byte size
    (elements times dtype size) is exactly its ``data_offsets`` range; that the ranges tile the data
    without gaps or overlaps; that the file is neither truncated nor longer than the header says."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes; no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: file is truncated (header of {n} bytes, file of {size} bytes)")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header of {n} bytes; safetensors allows at most "
                    f"{MAX_HEADER_BYTES})"
                )
            text = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc})") from exc
    if not text.lstrip(b" \t\r\n").startswith(b"{"):
        raise CheckpointError(f"{path}: not a valid safetensors file (the header is not a JSON object)")
    header = parse_json(text, path, "safetensors file")
    if not isinstance(header, dict):  # pragma: no cover - guarded by the '{' check
        raise CheckpointError(f"{path}: not a valid safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {_short(metadata)}")
    ranges = sorted((_check_entry(path, name, entry), name) for name, entry in header.items())
    position, previous = 0, None
    for (begin, end), name in ranges:
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            other = f"tensor {_short(previous)}" if previous is not None else "the start of the data"
            raise CheckpointError(
                f"{path}: tensor {_short(name)} (data_offsets [{begin}, {end}]) {what} {other} (ending at byte "
                f"{position}); the header is corrupt"
            )
        position, previous = end, name
    if 8 + n + position > size:
        missing = 8 + n + position - size
        last = ranges[-1][1]
        raise CheckpointError(
            f"{path}: file is truncated: {missing} bytes missing (tensor {_short(last)} and possibly others "
            "extend past the end); re-download or re-save the checkpoint"
        )
    if 8 + n + position < size:
        raise CheckpointError(
            f"{path}: {size - 8 - n - position} bytes after the last tensor that the header does not describe "
            "(a corrupt or partially overwritten file)"
        )
    return header


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` ``{tensor: shard file}`` of a ``model.safetensors.index.json``, checked: a JSON
    object whose ``weight_map`` maps tensor names to plain ``.safetensors`` file names in the same
    folder. Every failure (an empty file included) is a `CheckpointError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors index ({exc})") from exc
    if not raw.strip():
        raise CheckpointError(f"{path}: the safetensors index is empty (an interrupted download or save?)")
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: the safetensors index is larger than {MAX_HEADER_BYTES} bytes")
    index = parse_json(raw, path, "safetensors index (JSON)")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{path}: a safetensors index is a JSON object with a 'weight_map' object")
    weight_map = index["weight_map"]
    if not weight_map:
        raise CheckpointError(f"{path}: weight_map lists no safetensors file")
    for name, file in weight_map.items():
        if not _utf8(name):
            raise CheckpointError(f"{path}: a tensor name in weight_map is not valid UTF-8 ({_short(name)})")
        if (
            not isinstance(file, str)
            or not file.endswith(".safetensors")
            or not _utf8(file)
            or file != os.path.basename(file)
            or "/" in file
            or "\\" in file
            or file in (".", "..")
            or "\0" in file
        ):
            raise CheckpointError(
                f"{path}: weight_map[{_short(name)}] = {_short(file)} is not a .safetensors file name in the index's folder"
            )
    return dict(weight_map)


__all__ = ["CheckpointError", "DTYPE_BITS", "MAX_HEADER_BYTES", "parse_json", "read_header", "read_index"]
