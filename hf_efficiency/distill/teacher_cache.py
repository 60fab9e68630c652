"""Offline teacher: top-k teacher log-probabilities precomputed once into safetensors shards.

Layout of a cache folder::

    teacher_cache.json            index: teacher, top_k, examples, shards, format version
    teacher-00000.safetensors     logprobs [N, T, K] fp16, indices [N, T, K] int32,
                                  lengths [N] int64, input_hash [N] int64

Rows are stored in dataset order and padded to the longest row of their shard. ``input_hash`` (a crc32
of each row's ``input_ids``) lets training verify that it reads the row it was computed for.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..formats.safetensors_header import CheckpointError, parse_json, read_header

logger = logging.get_logger(__name__)

CACHE_INDEX = "teacher_cache.json"
CACHE_FORMAT = 1
TEACHER_KEYS = ("teacher_topk_logprobs", "teacher_topk_indices")


def input_hash(input_ids: Sequence[int] | torch.Tensor) -> int:
    """crc32 of a row's token ids (as little-endian int64), the key that ties a cached row to its input."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).flatten().contiguous()
    return zlib.crc32(ids.numpy().tobytes())


def _row_ids(row: Any) -> torch.Tensor:
    ids = row["input_ids"] if isinstance(row, dict) else row
    return torch.as_tensor(ids, dtype=torch.long).flatten()


@torch.no_grad()
def cache_teacher_logprobs(
    teacher: nn.Module,
    dataset: Sequence[Any],
    output_dir: str | os.PathLike,
    *,
    top_k: int = 32,
    batch_size: int = 8,
    shard_size: int = 1024,
    teacher_name: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Run ``teacher`` once over ``dataset`` (rows with ``input_ids``, optional ``attention_mask``) and
    write each position's ``top_k`` log-probabilities (temperature 1, full-vocab softmax) and token ids.

    Returns the cache folder. Rows are right-padded per batch; only the real tokens are kept.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    vocab = int(getattr(getattr(teacher, "config", None), "vocab_size", 0) or 0)
    if vocab and top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the teacher vocabulary ({vocab})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    n = len(dataset)
    shards: list[dict[str, Any]] = []
    bar = tqdm(total=n, desc="caching teacher log-probs", unit="row", disable=not show_progress)
    try:
        for shard_start in range(0, n, shard_size):
            rows = [dataset[i] for i in range(shard_start, min(n, shard_start + shard_size))]
            lps, idxs, lengths, hashes = [], [], [], []
            for b in range(0, len(rows), batch_size):
                batch = rows[b : b + batch_size]
                ids = [_row_ids(r) for r in batch]
                masks = [
                    torch.as_tensor(r["attention_mask"]).flatten().bool()
                    if isinstance(r, dict) and "attention_mask" in r
                    else torch.ones(len(i), dtype=torch.bool)
                    for r, i in zip(batch, ids)
                ]
                width = max(len(i) for i in ids)
                x = torch.zeros(len(ids), width, dtype=torch.long)
                m = torch.zeros(len(ids), width, dtype=torch.long)
                for r, (i, mk) in enumerate(zip(ids, masks)):
                    x[r, : len(i)] = i
                    m[r, : len(i)] = mk.long()
                logits = teacher(input_ids=x.to(device), attention_mask=m.to(device)).logits.float()
                top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
                for r, i in enumerate(ids):
                    lps.append(top.values[r, : len(i)].half().cpu())
                    idxs.append(top.indices[r, : len(i)].to(torch.int32).cpu())
                    lengths.append(len(i))
                    hashes.append(input_hash(i))
                bar.update(len(batch))
            width = max(lengths)
            lp = torch.zeros(len(lps), width, top_k, dtype=torch.float16)
            ix = torch.zeros(len(lps), width, top_k, dtype=torch.int32)
            for r, (a, b_) in enumerate(zip(lps, idxs)):
                lp[r, : len(a)] = a
                ix[r, : len(b_)] = b_
            name = f"teacher-{len(shards):05d}.safetensors"
            save_file(
                {
                    "logprobs": lp,
                    "indices": ix,
                    "lengths": torch.tensor(lengths, dtype=torch.int64),
                    "input_hash": torch.tensor(hashes, dtype=torch.int64),
                },
                str(out / name),
                metadata={"format": "pt", "top_k": str(top_k)},
            )
            shards.append({"file": name, "start": shard_start, "rows": len(lps)})
    finally:
        bar.close()
        teacher.train(was_training)
    index = {
        "format": CACHE_FORMAT,
        "teacher": teacher_name or getattr(getattr(teacher, "config", None), "_name_or_path", None),
        "top_k": top_k,
        "examples": n,
        "vocab_size": vocab or None,
        "shards": shards,
    }
    (out / CACHE_INDEX).write_text(json.dumps(index, indent=2))
    logger.info("Cached top-%d teacher log-probs for %d rows in %s", top_k, n, out)
    return out


class TeacherCacheError(CheckpointError):
    """A teacher cache folder that is corrupt, truncated, or was computed for other inputs (a ``ValueError``)."""


#: the tensors of every shard: name -> (safetensors dtype, dimensions)
SHARD_TENSORS = {"logprobs": ("F16", 3), "indices": ("I32", 3), "lengths": ("I64", 1), "input_hash": ("I64", 1)}
_MAX_INDEX_BYTES = 64_000_000


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class TeacherCache:
    """Read-only access to a cache folder; rows are memory-mapped from the shards on demand.

    Opening checks the index (format, ``top_k``, shards covering rows ``0 .. examples-1`` in order) and every
    shard's safetensors header (the four tensors, their dtypes and ``[rows, T, top_k]`` shapes) without reading
    tensor data; a shard's ``lengths`` are checked when it is first used, and each row read is checked (its
    length against ``input_ids``, its hash, finite non-positive log-probabilities, token ids inside the
    vocabulary). Every problem is a `TeacherCacheError` naming the file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index_file = self.folder / CACHE_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a teacher cache (no {CACHE_INDEX}); create one with "
                "hf_efficiency.distill.cache_teacher_logprobs or `hf-efficiency distill "
                "--cache-teacher DIR`"
            )
        self.index = self._read_index(index_file)
        self.top_k = self.index["top_k"]
        self.vocab_size = self.index.get("vocab_size")
        self._shards: list[dict[str, Any]] = self.index["shards"]
        self._widths: dict[str, int] = {}
        for shard in self._shards:
            self._widths[shard["file"]] = self._check_shard(shard)
        self._handles: dict[str, Any] = {}
        self._meta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _read_index(self, index_file: Path) -> dict[str, Any]:
        where = str(index_file)
        with open(index_file, "rb") as fh:
            raw = fh.read(_MAX_INDEX_BYTES + 1)
        if len(raw) > _MAX_INDEX_BYTES:
            raise TeacherCacheError(f"{where}: larger than {_MAX_INDEX_BYTES} bytes: not a teacher cache index")
        try:
            index = parse_json(raw, where, "teacher cache index (JSON)")
        except CheckpointError as exc:
            raise TeacherCacheError(str(exc)) from None
        if not isinstance(index, dict):
            raise TeacherCacheError(f"{where}: a teacher cache index is a JSON object")
        if index.get("format") != CACHE_FORMAT or isinstance(index.get("format"), bool):
            raise TeacherCacheError(
                f"Unsupported teacher cache format {index.get('format')!r:.100} in {self.folder} (this version reads "
                f"format {CACHE_FORMAT}); recompute the cache"
            )
        for key, low in (("top_k", 1), ("examples", 0)):
            if not _count(index.get(key), low):
                raise TeacherCacheError(f"{where}: {key}={index.get(key)!r:.100} is not an integer >= {low}")
        vocab = index.get("vocab_size")
        if vocab is not None and (not _count(vocab, 1) or index["top_k"] > vocab):
            raise TeacherCacheError(f"{where}: vocab_size={vocab!r:.100} is not None or an integer >= top_k")
        shards = index.get("shards")
        if not isinstance(shards, list):
            raise TeacherCacheError(f"{where}: shards must be a list")
        start = 0
        for i, s in enumerate(shards):
            if not (
                isinstance(s, dict)
                and isinstance(s.get("file"), str)
                and s["file"].endswith(".safetensors")
                and s["file"] == os.path.basename(s["file"])
                and "/" not in s["file"]
                and "\\" not in s["file"]
                and _count(s.get("start"), 0)
                and _count(s.get("rows"), 0)
            ):
                raise TeacherCacheError(
                    f"{where}: shards[{i}] must be {{file: a .safetensors name in the folder, start, rows}}, "
                    f"got {s!r:.200}"
                )
            if s["start"] != start:
                raise TeacherCacheError(
                    f"{where}: shards[{i}] starts at row {s['start']}, expected {start} (shards cover the rows in order)"
                )
            start += s["rows"]
        if start != index["examples"]:
            raise TeacherCacheError(f"{where}: the shards hold {start} rows but examples={index['examples']}")
        if len({s["file"] for s in shards}) != len(shards):
            raise TeacherCacheError(f"{where}: a shard file is listed twice")
        return index

    def _check_shard(self, shard: dict[str, Any]) -> int:
        """Check a shard's header against the index; return its padded width ``T``."""
        path = self.folder / shard["file"]
        if not path.is_file():
            raise TeacherCacheError(f"{path}: shard listed in {CACHE_INDEX} is missing")
        try:
            header = read_header(path)
        except CheckpointError as exc:
            raise TeacherCacheError(str(exc)) from None
        rows = shard["rows"]
        width = None
        for name, (dtype, ndim) in SHARD_TENSORS.items():
            entry = header.get(name)
            if entry is None:
                raise TeacherCacheError(f"{path}: tensor {name!r} is missing")
            shape = entry["shape"]
            if entry["dtype"] != dtype or len(shape) != ndim or shape[0] != rows:
                expected = f"{dtype} [{rows}{', T, ' + str(self.top_k) if ndim == 3 else ''}]"
                raise TeacherCacheError(f"{path}: tensor {name!r} is {entry['dtype']} {shape}, expected {expected}")
            if ndim == 3:
                if shape[2] != self.top_k or (width is not None and shape[1] != width):
                    raise TeacherCacheError(
                        f"{path}: tensor {name!r} has shape {shape}, expected [{rows}, T, {self.top_k}] with the "
                        "same T for logprobs and indices"
                    )
                width = shape[1]
        return width

    def __len__(self) -> int:
        return self.index["examples"]

    def _shard(self, i: int) -> dict[str, Any]:
        if 0 <= i < len(self):
            lo, hi = 0, len(self._shards)
            while lo < hi:  # shards are contiguous and in order (checked): bisect on start
                mid = (lo + hi) // 2
                if self._shards[mid]["start"] + self._shards[mid]["rows"] <= i:
                    lo = mid + 1
                else:
                    hi = mid
            return self._shards[lo]
        raise IndexError(f"row {i} is outside the teacher cache ({len(self)} rows)")

    def _open(self, name: str):
        if name not in self._handles:
            path = self.folder / name
            try:
                h = safe_open(str(path), framework="pt")
                lengths, hashes = h.get_tensor("lengths"), h.get_tensor("input_hash")
            except Exception as exc:  # safetensors' own error types (the file changed since it was checked)
                raise TeacherCacheError(f"{path}: cannot read the teacher cache shard ({exc})") from exc
            width = self._widths[name]
            if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > width):
                raise TeacherCacheError(
                    f"{path}: row lengths must lie in [0, {width}] (the padded width), found "
                    f"[{int(lengths.min())}, {int(lengths.max())}]; the shard is corrupt"
                )
            self._handles[name] = h
            self._meta[name] = (lengths, hashes)
        return self._handles[name]

    def row(self, i: int, input_ids: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs [T, K] float32, indices [T, K] int64)`` of row ``i``; checks ``input_ids`` if given."""
        s = self._shard(i)
        h = self._open(s["file"])
        lengths, hashes = self._meta[s["file"]]
        r = i - s["start"]
        length = int(lengths[r])
        where = f"{self.folder / s['file']}: row {i}"
        if input_ids is not None:
            ids = _row_ids(input_ids)
            if input_hash(ids) != int(hashes[r]):
                raise TeacherCacheError(
                    f"Row {i} of the dataset does not match the teacher cache in {self.folder}: the "
                    "cache was computed for other inputs (different data, order or tokenization)"
                )
            if length != ids.numel():
                raise TeacherCacheError(f"{where}: cached length {length} but the row has {ids.numel()} tokens")
        lp = h.get_slice("logprobs")[r : r + 1, :length][0].float()
        ix = h.get_slice("indices")[r : r + 1, :length][0].long()
        if bool(torch.isnan(lp).any()) or bool((lp > 0).any()):
            raise TeacherCacheError(f"{where}: holds log-probabilities that are NaN or positive; the shard is corrupt")
        high = self.vocab_size if self.vocab_size is not None else None
        if ix.numel() and (int(ix.min()) < 0 or (high is not None and int(ix.max()) >= high)):
            raise TeacherCacheError(
                f"{where}: holds token ids outside [0, {high if high is not None else 'vocab'}); the shard is corrupt"
            )
        return lp, ix


class TeacherCacheDataset(torch.utils.data.Dataset):
    """Wraps a dataset so each row also carries its cached teacher top-k log-probs and indices."""

    def __init__(self, dataset: Sequence[Any], cache: TeacherCache | str | os.PathLike):
        self.dataset = dataset
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        if len(self.cache) != len(dataset):
            raise ValueError(
                f"The teacher cache has {len(self.cache)} rows but the dataset has {len(dataset)}; "
                "recompute the cache for this dataset"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.dataset[i])
        lp, ix = self.cache.row(i, _row_ids(row))
        row["teacher_topk_logprobs"] = lp
        row["teacher_topk_indices"] = ix
        return row


class TeacherCacheCollator:
    """Collates the teacher tensors (padded to the batch width, on the tokenizer's padding side) and hands
    the rest of each row to ``base_collator``."""

    def __init__(self, base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]], padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.base_collator = base_collator
        self.padding_side = padding_side

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows or TEACHER_KEYS[0] not in rows[0]:  # e.g. evaluation rows: no teacher needed
            return self.base_collator(rows)
        teacher = [(r["teacher_topk_logprobs"], r["teacher_topk_indices"]) for r in rows]
        rows = [{k: v for k, v in r.items() if k not in TEACHER_KEYS} for r in rows]
        batch = self.base_collator(rows)
        width = batch["input_ids"].shape[1]
        k = teacher[0][0].shape[-1]
        lp = torch.zeros(len(rows), width, k)
        ix = torch.zeros(len(rows), width, k, dtype=torch.long)
        for r, (a, b) in enumerate(teacher):
            n = min(len(a), width)
            sl = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            lp[r, sl] = a[:n]
            ix[r, sl] = b[:n]
        batch["teacher_topk_logprobs"] = lp
        batch["teacher_topk_indices"] = ix
        return batch
