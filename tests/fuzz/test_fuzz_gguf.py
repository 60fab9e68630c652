"""Fuzzing the GGUF reader (`open_reader`, and `read_gguf` with transformers' config from the file's metadata):
magic and version, tensor and KV counts, string and array lengths, the tensor table's dimensions, types and
offsets, and the block data. Each input must end in `FormatError` or be accepted with every tensor inside the
file, no two overlapping, and a state dict that fits the model its metadata describes."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch
from fuzz.fuzzkit import (
    Slot,
    apply_bytes,
    attempt,
    byte_mutation,
    changed_range,
    fuzz_settings,
    mutated_positions,
    scratch_dir,
)
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from hypothesis import given
from hypothesis import strategies as st

import hf_efficiency  # noqa: F401  (registration)
from hf_efficiency.formats.common import FormatError, check_state_dict, efficiency_config_for, skeleton
from hf_efficiency.formats.gguf import load_gguf_config, open_reader, read_gguf

PARSE = "GGUF header and tensor table (open_reader)"
FULL = "GGUF file -> state dict (load_gguf_config + read_gguf)"
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 256, 2, 1, 32
PARTS = {
    "attn_q": ("Q4_0", (HIDDEN, HIDDEN)),
    "attn_k": ("Q8_0", (HIDDEN // 2, HIDDEN)),
    "attn_v": ("Q5_1", (HIDDEN // 2, HIDDEN)),
    "attn_output": ("Q4_1", (HIDDEN, HIDDEN)),
    "ffn_gate": ("Q5_0", (FFN, HIDDEN)),
    "ffn_up": ("Q8_0", (FFN, HIDDEN)),
    "ffn_down": ("Q4_K", (HIDDEN, FFN)),
}


def write_gguf(path, *, block_count: int = 1, extra=None) -> None:
    """A one-layer Llama GGUF (64 wide, one ggml type per projection, a Q4_K with random blocks)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz")
    w.add_block_count(block_count)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_array("fuzz.numbers", [1, 2, 3])
    w.add_array("fuzz.words", ["a", "bc"])
    w.add_key_value("fuzz.bytes", [1, 2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    if extra:
        extra(w)
    w.add_tensor("token_embd.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    for part, (type_name, shape) in PARTS.items():
        if type_name.endswith("_K"):
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[T[type_name]]
            nb = shape[0] * shape[1] // block_elems
            raw = rng.integers(0, 256, (nb, block_bytes), dtype=np.uint8)
            for off in (0, 2):  # sane float16 super-block scale and minimum
                raw[:, off : off + 2] = (
                    (rng.standard_normal(nb) * 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
                )
            data = raw.reshape(shape[0], -1)
        else:
            data = quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), T[type_name])
        w.add_tensor(f"blk.0.{part}.weight", data, raw_dtype=T[type_name])
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _offset(reader, part: np.ndarray) -> int:
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def integer_slots(reader) -> tuple[Slot, ...]:
    """Every integer field of the header: counts, string and array lengths, value types, the tensor table."""
    slots = []
    for name, field in reader.fields.items():
        for i, part in enumerate(field.parts):
            if part.dtype.kind in "ui" and part.size == 1:
                kind = field.types[0] if field.types else None
                if name.startswith("GGUF."):
                    what = "value"
                elif i < 3:
                    what = "key length" if i == 0 else "value type"
                elif kind == gguf.GGUFValueType.ARRAY:
                    what = {3: "item type", 4: "array length"}.get(i, "item or item string length")
                elif kind == gguf.GGUFValueType.STRING:
                    what = "string length"
                else:
                    what = "value"
                slots.append(Slot(_offset(reader, part), part.dtype.itemsize, f"{name} {what} ({part.dtype})"))
    for t in reader.tensors:
        for part, what in zip(t.field.parts, ("name length", "name", "n_dims", "dims", "type", "offset")):
            if what == "name":
                continue
            for i in range(part.size):
                slots.append(
                    Slot(_offset(reader, part) + i * part.dtype.itemsize, part.dtype.itemsize, f"{t.name} {what}")
                )
    return tuple(slots)


def table(reader) -> list[tuple]:
    return [
        (t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]


@functools.cache
def template() -> dict:
    """The template file's bytes, where its header ends and its tensor data ends, its integer fields."""
    path = scratch_dir("gguf-template") / "fuzz.gguf"
    write_gguf(path)
    data = path.read_bytes()
    reader = open_reader(str(path))
    info = {
        "data": data,
        "header_end": int(reader.data_offset),
        "data_end": max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors),
        "slots": integer_slots(reader),
        "table": table(reader),
    }
    del reader
    return info


def check_table(reader, size: int) -> None:
    ranges = []
    for t in reader.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[T(int(t.tensor_type))]
        count = int(np.prod([int(d) for d in t.shape], dtype=object))
        assert count * type_size % block == 0 and int(t.n_bytes) == count * type_size // block, t.name
        assert int(t.data.nbytes) == int(t.n_bytes), f"{t.name}: data of {t.data.nbytes} bytes, table says {t.n_bytes}"
        assert int(t.data_offset) + int(t.n_bytes) <= size, f"{t.name} extends past the end of the file"
        ranges.append((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name))
    ranges.sort()
    for (_, end, a), (begin, _, b) in zip(ranges, ranges[1:]):
        assert begin >= end, f"tensors {a} and {b} overlap"
    assert len({t.name for t in reader.tensors}) == len(reader.tensors), "duplicate tensor names"


def _mutate(info, data):
    original = info["data"]
    mutation = data.draw(
        byte_mutation(len(original), hot=(0, info["header_end"]), slots=info["slots"]), label="mutation"
    )
    mutated = apply_bytes(original, mutation)
    path = scratch_dir("fuzz-gguf") / "fuzz.gguf"
    path.write_bytes(mutated)
    must_reject = None
    if mutation[0] == "truncate" and mutation[1] < info["data_end"]:
        must_reject = "a tensor's data is cut off"
    touched = (
        changed_range(original, mutated)
        if len(mutated) == len(original)
        else mutated_positions(len(original), mutation)
    )
    data_only = mutation[0] in ("flip", "set", "slot", "zero-tail") and (
        touched is None or touched[0] >= info["header_end"]
    )
    data_only = data_only or mutation[0] == "append"
    return path, mutation, must_reject, data_only


@fuzz_settings(250)
@given(data=st.data())
def test_open_reader_survives_mutations(data):
    info = template()
    path, mutation, must_reject, data_only = _mutate(info, data)

    def check(reader):
        check_table(reader, path.stat().st_size)
        if data_only:
            assert table(reader) == info["table"], "a change in the tensor data changed the tensor table"

    attempt(
        PARSE,
        lambda: open_reader(str(path)),
        errors=(FormatError,),
        must_reject=must_reject,
        check=check,
        time_limit=20,
        trace_memory_mb=256,
        what=f"{mutation!r:.300}",
    )


def read_all(path):
    reader = open_reader(str(path))
    config = load_gguf_config(str(path.parent), path.name)
    state_dict, formats, float_linears, _ = read_gguf(str(path), config, reader=reader, progress=False)
    qcfg = efficiency_config_for(formats, float_linears)
    check_state_dict(skeleton(config, qcfg), state_dict, str(path))  # as load_gguf does before from_pretrained
    return state_dict, formats


def consistent(result) -> None:
    state_dict, formats = result
    assert formats, "no quantized module"
    for name, tensor in state_dict.items():
        if name.endswith(("weight_scale", "weight_min")):
            assert bool(torch.isfinite(tensor).all()), f"{name} holds non-finite values"


@fuzz_settings(25)
@given(data=st.data())
def test_read_gguf_survives_mutations(data):
    path, mutation, must_reject, _ = _mutate(template(), data)
    attempt(
        FULL,
        lambda: read_all(path),
        errors=(FormatError,),
        must_reject=must_reject,
        check=consistent,
        time_limit=60,
        what=f"{mutation!r:.300}",
    )


# ----------------------------------------------------------------------------- the specific cases


def _set_slot(path, slot: Slot, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[slot.offset : slot.offset + slot.size] = value.to_bytes(slot.size, "little")
    path.write_bytes(bytes(data))


def test_huge_array_length_fails_fast_instead_of_looping(tmp_path):
    """gguf's reader loops once per claimed item, and past the end of the file a uint8 item reads as an empty
    array without error: an array claiming 2**60 items never ended (and grew a list of empty arrays)."""
    info = template()
    path = tmp_path / "x.gguf"
    path.write_bytes(info["data"])
    slot = next(s for s in info["slots"] if s.name == "fuzz.bytes array length (uint64)")
    _set_slot(path, slot, 2**60)
    with pytest.raises(FormatError, match=r"x.gguf: a metadata array at byte \d+ claims 1152921504606846976 items"):
        open_reader(str(path))
    _set_slot(path, slot, 100_000)  # fewer than the cap, more than the file holds
    with pytest.raises(FormatError, match=r"x.gguf: file is truncated or its header is corrupt: a field at byte \d+"):
        open_reader(str(path))


def test_overlapping_tensor_offsets_are_refused(tmp_path):
    info = template()
    """Two tensors reading the same bytes used to load silently (both got the first one's data)."""
    path = tmp_path / "x.gguf"
    path.write_bytes(info["data"])
    offsets = [s for s in info["slots"] if s.name.endswith(" offset")]
    norm1 = next(s for s in offsets if s.name.startswith("blk.0.attn_norm.weight"))
    norm2 = next(s for s in offsets if s.name.startswith("blk.0.ffn_norm.weight"))
    first = int.from_bytes(info["data"][norm1.offset : norm1.offset + 8], "little")
    _set_slot(path, norm2, first)
    with pytest.raises(FormatError, match=r"tensor 'blk.0.ffn_norm.weight' starts at data offset \d+, expected \d+"):
        open_reader(str(path))


def test_absurd_block_count_is_refused_before_building_the_model(tmp_path):
    path = tmp_path / "x.gguf"
    write_gguf(path, block_count=2**31 - 1)
    config = load_gguf_config(str(tmp_path), "x.gguf")
    with pytest.raises(FormatError, match=r"num_hidden_layers=2147483647, but the checkpoint holds 12 tensors"):
        read_gguf(str(path), config, progress=False)


def test_non_finite_block_scale_is_refused(tmp_path):
    info = template()
    path = tmp_path / "x.gguf"
    data = bytearray(info["data"])
    q = next(t for t in info["table"] if t[0] == "blk.0.attn_q.weight")  # Q4_0: float16 d first in each block
    data[q[3] : q[3] + 2] = np.array([np.inf], dtype=np.float16).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"tensor 'blk.0.attn_q.weight' \(Q4_0\) holds non-finite block scales"):
        read_all(path)


def test_metadata_transformers_cannot_use_is_a_format_error(tmp_path):
    path = tmp_path / "x.gguf"
    write_gguf(path, extra=lambda w: None)
    data = bytearray(path.read_bytes())
    i = data.index(b"llama.attention.head_count\x04")  # the uint32 after the type: 2 heads -> 0 heads
    data[i + len(b"llama.attention.head_count") + 4 : i + len(b"llama.attention.head_count") + 8] = bytes(4)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"x.gguf: transformers cannot build"):
        read_all(path)
