"""Fuzzing `read_header` (every reader of ours that opens a safetensors file goes through it): truncations,
bit flips, absurd header lengths and JSON edits of the header (wrong types, unknown dtypes, negative,
overlapping and out-of-range offsets, shapes whose size disagrees with the offsets, 2**40-element shapes,
duplicate names). Each input must end in `CheckpointError` or be accepted with exactly the view
``safetensors`` itself has of the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from fuzz.fuzzkit import (
    Slot,
    apply_bytes,
    apply_json,
    attempt,
    byte_mutation,
    changed_range,
    fuzz_settings,
    json_mutation,
    json_paths,
    mutated_positions,
    safetensors_parts,
    scratch_dir,
    with_header,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from hf_efficiency.formats.safetensors_header import CheckpointError, read_header, read_index

READER = "safetensors header (read_header)"

TEMPLATES = {
    "mixed": save(
        {
            "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "a.scale": torch.ones(5, dtype=torch.float16),
            "codes": torch.arange(4, dtype=torch.int32).reshape(2, 2),
            "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
            "bytes": torch.arange(7, dtype=torch.uint8),
            "one": torch.tensor([3], dtype=torch.int64),
        },
        metadata={"format": "pt"},
    ),
    "single": save({"w": torch.zeros(4, 4)}),
    "none": save({}, metadata={"format": "pt"}),
}


def _header_slots(data: bytes) -> tuple[Slot, ...]:
    return (Slot(0, 8, "header length"), Slot(0, 4, "header length (low half)"), Slot(4, 4, "header length (high)"))


def safetensors_view(path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` as the safetensors library reads the file (raises if it refuses it)."""
    with safe_open(str(path), framework="pt") as fh:
        out = {}
        for name in fh.keys():
            sl = fh.get_slice(name)
            out[name] = (sl.get_dtype(), list(sl.get_shape()))
        return out


def consistent_with_safetensors(path, header: dict) -> None:
    try:
        view = safetensors_view(path)
    except Exception as exc:  # noqa: BLE001 - whatever safetensors raises: we accepted a file it refuses
        raise AssertionError(f"read_header accepted a file safetensors refuses: {exc}") from exc
    ours = {name: (e["dtype"], list(e["shape"])) for name, e in header.items()}
    assert ours == view, f"read_header's view {ours} differs from safetensors' {view}"


@fuzz_settings(250)
@given(data=st.data())
def test_read_header_survives_byte_mutations(data):
    name = data.draw(st.sampled_from(sorted(TEMPLATES)), label="template")
    original = TEMPLATES[name]
    header, n = safetensors_parts(original)
    mutation = data.draw(byte_mutation(len(original), hot=(0, 8 + n), slots=_header_slots(original)), label="mutation")
    mutated = apply_bytes(original, mutation)
    path = scratch_dir("fuzz-safetensors") / "model.safetensors"
    path.write_bytes(mutated)
    must_reject = None
    if mutation[0] == "truncate" and len(mutated) < len(original):
        must_reject = "truncated file"
    elif mutation[0] == "append":
        must_reject = "bytes after the last tensor"
    touched = (
        changed_range(original, mutated)
        if len(mutated) == len(original)
        else mutated_positions(len(original), mutation)
    )
    data_only = (
        mutation[0] in ("flip", "set", "zero-tail", "slot") and touched is not None and touched[0] >= 8 + n
    ) or mutated == original

    def check(got):
        consistent_with_safetensors(path, got)
        if data_only:  # the header itself is untouched: so must be what we read
            expected = {k: v for k, v in header.items() if k != "__metadata__"}
            assert got == expected, "a change in the tensor data changed the header we read"

    attempt(
        READER,
        lambda: read_header(path),
        errors=(CheckpointError,),
        must_reject=must_reject,
        check=check,
        time_limit=20,
        trace_memory_mb=64,
        what=f"{name} + {mutation!r:.300}",
    )


@fuzz_settings(250)
@given(data=st.data())
def test_read_header_survives_json_edits_of_the_header(data):
    name = data.draw(st.sampled_from(sorted(TEMPLATES)), label="template")
    original = TEMPLATES[name]
    header, _ = safetensors_parts(original)
    edit = data.draw(json_mutation(header, json_paths(header)), label="edit")
    delta = data.draw(st.sampled_from([0] * 8 + [1, -1, 2**20, 2**40]), label="length delta")
    mutated = with_header(original, apply_json(header, edit), delta)
    path = scratch_dir("fuzz-safetensors") / "model.safetensors"
    path.write_bytes(mutated)
    attempt(
        READER,
        lambda: read_header(path),
        errors=(CheckpointError,),
        must_reject="duplicate tensor name" if edit[0] == "duplicate" and len(edit[1]) == 1 else None,
        check=lambda got: consistent_with_safetensors(path, got),
        time_limit=20,
        trace_memory_mb=64,
        what=f"{name} + {edit!r:.300}, length delta {delta}",
    )


# ----------------------------------------------------------------------------- the specific messages


def _file_with_header(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_shape_larger_than_its_data_names_tensor_and_file(tmp_path):
    """safetensors itself says only 'invalid shape, data type, or offset for tensor'; we name both."""
    path = tmp_path / "model-00001-of-00002.safetensors"
    _file_with_header(
        path,
        {
            "model.norm.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 64]},
            "lm_head.weight": {"dtype": "F16", "shape": [4], "data_offsets": [64, 72]},
        },
        bytes(72),
    )
    with pytest.raises(
        CheckpointError,
        match=r"model-00001-of-00002.safetensors: tensor 'model.norm.weight': shape \[8, 4\] of F32 needs 128 bytes "
        r"but its data_offsets \[0, 64\] hold 64 bytes",
    ):
        read_header(path)


@pytest.mark.parametrize(
    "header, message",
    [
        ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, r"needs more than 2\*\*64 bytes"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "shape must be a list of non-negative"),
        ({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "shape must be a list of non-negative"),
        ({"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, "unknown dtype 'F33'"),
        ({"w": {"dtype": "F32", "shape": [4]}}, "header entry lacks data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, r"data_offsets must be \[begin, end\]"),
        ({"w": [1, 2]}, "header entry must be an object"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            r"tensor 'b' \(data_offsets \[8, 16\]\) overlaps tensor 'a'",
        ),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "leaves a gap after the start of the data"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "8 bytes after the last tensor"),
        ({"__metadata__": {"format": 1}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "__metadata__"),
    ],
)
def test_bad_headers_are_named(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    _file_with_header(path, header, bytes(16))
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_duplicate_names_huge_length_and_deep_nesting(tmp_path):
    path = tmp_path / "x.safetensors"
    raw = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(CheckpointError, match="duplicate key 'w'"):
        read_header(path)  # safetensors silently keeps the last one
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="file is truncated"):
        read_header(path)
    raw = b"{" + b'"a":' * 1 + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_header(path)  # json raises RecursionError, which is no ValueError


def test_empty_or_invalid_index_names_the_file(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: the safetensors index is empty"):
        read_index(index)
    index.write_text('{"weight_map": {"a": "model-1.safetensors"')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid safetensors index"):
        read_index(index)
    index.write_text('{"weight_map": {"a": "../../etc/model.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"is not a .safetensors file name in the index's folder"):
        read_index(index)
    index.write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    assert read_index(index) == {"a": "model-1.safetensors"}
