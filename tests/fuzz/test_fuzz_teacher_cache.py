"""Fuzzing the teacher-logit cache reader (`TeacherCache`, as `TeacherCacheDataset` uses it): edits of the
index ``teacher_cache.json``, truncations, bit flips and header edits of the shards. Each input must end in
`TeacherCacheError` (our `CheckpointError`) or give, for every row, exactly the rows the cache was written
with (or, after a change in the stored log-probabilities or token ids themselves, rows of the right shape
with finite non-positive log-probabilities and ids inside the vocabulary)."""

from __future__ import annotations

import functools
import json
import os
from types import SimpleNamespace

import pytest
import torch
from fuzz.fuzzkit import (
    apply_bytes,
    apply_json,
    attempt,
    byte_mutation,
    changed_tensors,
    fresh_folder,
    fuzz_settings,
    json_mutation,
    json_paths,
    safetensors_parts,
    scratch_dir,
    with_header,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hf_efficiency.distill.teacher_cache import (
    CACHE_INDEX,
    TeacherCache,
    TeacherCacheError,
    cache_teacher_logprobs,
)
from hf_efficiency.formats.safetensors_header import CheckpointError

READER = "teacher-logit cache (TeacherCache)"
VOCAB, TOP_K = 16, 4
ROWS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11], [12, 13], [14, 15, 0, 1], [2, 3, 4]]


class TinyTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=VOCAB, _name_or_path="tiny")
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def read_rows(folder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = TeacherCache(folder)
    if len(cache) != len(ROWS):
        raise TeacherCacheError(f"{len(cache)} rows for a dataset of {len(ROWS)}")  # TeacherCacheDataset's check
    return [cache.row(i, ROWS[i]) for i in range(len(ROWS))]


@functools.cache
def template() -> dict:
    folder = scratch_dir("teacher-cache-template") / "cache"
    cache_teacher_logprobs(
        TinyTeacher(), [{"input_ids": r} for r in ROWS], folder, top_k=TOP_K, shard_size=3, show_progress=False
    )
    files = {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}
    return {"files": files, "rows": read_rows(folder)}


def plausible(rows) -> None:
    assert len(rows) == len(ROWS)
    for (lp, ix), ids in zip(rows, ROWS):
        assert lp.shape == (len(ids), TOP_K) and ix.shape == (len(ids), TOP_K), (lp.shape, ix.shape)
        assert lp.dtype == torch.float32 and ix.dtype == torch.int64
        assert not bool(torch.isnan(lp).any()) and bool((lp <= 0).all()), "log-probabilities NaN or positive"
        assert bool(((ix >= 0) & (ix < VOCAB)).all()), "token ids outside the vocabulary"


def same_rows(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@fuzz_settings(120)
@given(data=st.data())
def test_teacher_cache_survives_mutations(data):
    info = template()
    files = info["files"]
    folder = fresh_folder("fuzz-teacher-cache", "cache", files)
    target = data.draw(st.sampled_from(sorted(files)), label="file")
    original = files[target]
    values_only = False  # only stored log-probabilities / token ids changed: rows may differ but must be plausible
    must_reject = None
    if target == CACHE_INDEX and data.draw(st.booleans(), label="as JSON"):
        doc = json.loads(original)
        edit = data.draw(json_mutation(doc, json_paths(doc)), label="edit")
        mutated = apply_json(doc, edit).encode("utf-8", "surrogatepass")
        what = f"{target} + {edit!r:.300}"
        if edit[0] == "duplicate":
            must_reject = "duplicate JSON key"
        if edit[1] in (("teacher",), ("vocab_size",)) and edit[0] in ("replace", "delete"):
            values_only = True  # informational keys (vocab_size only bounds the ids)
    elif target.endswith(".safetensors") and data.draw(st.booleans(), label="header as JSON"):
        header, _ = safetensors_parts(original)
        edit = data.draw(json_mutation(header, json_paths(header)), label="edit")
        mutated = with_header(original, apply_json(header, edit))
        what = f"{target} header + {edit!r:.300}"
        if edit[0] == "duplicate" and len(edit[1]) == 1:
            must_reject = "duplicate tensor name"
        values_only = edit[1][:1] == ("__metadata__",)
    else:
        hot = (0, len(original))
        if target.endswith(".safetensors"):
            header, n = safetensors_parts(original)
            hot = (0, 8 + n)
        mutation = data.draw(byte_mutation(len(original), hot=hot), label="mutation")
        mutated = apply_bytes(original, mutation)
        what = f"{target} + {mutation!r:.300}"
        if target.endswith(".safetensors"):
            if mutation[0] in ("truncate", "append"):
                must_reject = "the file's length disagrees with its header"
            if len(mutated) == len(original):
                values_only = bool(changed_tensors(original, mutated) & {"logprobs", "indices"})
    (folder / target).write_bytes(mutated)

    def check(rows):
        plausible(rows)
        if not values_only:
            assert same_rows(rows, info["rows"]), "a change in the cache's structure changed the rows read"

    attempt(
        READER,
        lambda: read_rows(folder),
        errors=(TeacherCacheError,),
        must_reject=must_reject,
        check=check,
        time_limit=30,
        what=what,
    )


# ----------------------------------------------------------------------------- the specific cases


@pytest.fixture
def cache(tmp_path):
    folder = tmp_path / "cache"
    for f, content in template()["files"].items():
        (folder / f).parent.mkdir(exist_ok=True)
        (folder / f).write_bytes(content)
    return folder


def test_error_type_is_ours_and_a_value_error():
    assert issubclass(TeacherCacheError, CheckpointError) and issubclass(TeacherCacheError, ValueError)


def test_truncated_shard_is_named(cache):
    shard = cache / "teacher-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TeacherCacheError, match=r"teacher-00001.safetensors: file is truncated: 10 bytes missing"):
        TeacherCache(cache)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"top_k": "4"}, r"top_k='4' is not an integer >= 1"),
        ({"examples": 8}, r"the shards hold 7 rows but examples=8"),
        ({"format": True}, r"Unsupported teacher cache format True"),
        ({"shards": [{"file": "../x.safetensors", "start": 0, "rows": 7}]}, r"shards\[0\] must be"),
        ({"top_k": 5}, r"tensor 'logprobs' has shape \[3, \d+, 4\], expected \[3, T, 5\]"),
    ],
)
def test_bad_index_values_are_named(cache, edit, message):
    index = json.loads((cache / CACHE_INDEX).read_text())
    index.update(edit)
    (cache / CACHE_INDEX).write_text(json.dumps(index))
    with pytest.raises(TeacherCacheError, match=message):
        TeacherCache(cache)


def test_empty_index_and_corrupt_lengths_are_named(cache):
    (cache / CACHE_INDEX).write_bytes(b"")
    with pytest.raises(TeacherCacheError, match=r"teacher_cache.json: not a valid teacher cache index"):
        TeacherCache(cache)


def test_flipped_length_is_refused_not_read_short(cache):
    """A row length changed in the shard used to return a shorter row silently."""
    shard = cache / "teacher-00000.safetensors"
    data = bytearray(shard.read_bytes())
    header, n = safetensors_parts(bytes(data))
    begin = 8 + n + header["lengths"]["data_offsets"][0]
    data[begin] ^= 1  # row 0: 3 tokens -> 2
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=r"row 0: cached length 2 but the row has 3 tokens"):
        TeacherCache(cache).row(0, ROWS[0])
