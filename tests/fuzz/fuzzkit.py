"""Shared pieces of the reader fuzz tests: settings, the outcome bookkeeping every test reports, and the
mutation strategies (bytes, integer fields, JSON documents).

An input is *rejected* when the reader raises our error type (with a message), *accepted* when it returns;
anything else is a crash and fails the test, as does an accepted input the test's oracle finds inconsistent
(a *silent load*). The counts per reader are printed at the end of the pytest run (tests/fuzz/conftest.py)
and written to ``$HF_EFFICIENCY_FUZZ_REPORT`` (JSON) when that is set.

``HF_EFFICIENCY_FUZZ_EXAMPLES=N`` raises every test's example count to N (the long run,
``python tools/fuzz_readers.py``); by default each test runs a small, derandomized budget sized for CI.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import shutil
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES_ENV = "HF_EFFICIENCY_FUZZ_EXAMPLES"
REPORT_ENV = "HF_EFFICIENCY_FUZZ_REPORT"
LONG_RUN = bool(os.environ.get(EXAMPLES_ENV))


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings: ``ci_examples`` (derandomized, so CI is reproducible) or the long run's count."""
    n = int(os.environ.get(EXAMPLES_ENV) or ci_examples)
    return settings(
        max_examples=n,
        deadline=None,  # timing is checked by `attempt` with a generous bound (a shared CI machine is noisy)
        database=None,  # nothing written into the checkout
        derandomize=not LONG_RUN,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@functools.cache
def _scratch_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="hf-efficiency-fuzz-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def scratch_dir(name: str) -> Path:
    """A directory for one test module's files (not a pytest fixture: hypothesis would print a fixture's
    value, megabytes of template bytes, with every failure)."""
    path = _scratch_root() / name
    path.mkdir(exist_ok=True)
    return path


def fresh_folder(name: str, sub: str, files: dict[str, bytes]) -> Path:
    """``scratch_dir(name) / sub``, emptied and filled with ``files`` (``{file name: bytes}``)."""
    path = scratch_dir(name) / sub
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    for f, content in files.items():
        (path / f).write_bytes(content)
    return path


# ----------------------------------------------------------------------------- outcome bookkeeping


@dataclass
class Stats:
    tried: int = 0
    rejected: int = 0
    accepted: int = 0
    crashes: int = 0
    silent: int = 0
    max_seconds: float = 0.0
    max_traced_mb: float = 0.0
    maxrss_growth_mb: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


STATS: dict[str, Stats] = {}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


class SilentLoad(AssertionError):
    """An accepted input the oracle finds inconsistent."""


def attempt(
    reader: str,
    call: Callable[[], Any],
    *,
    errors: tuple[type[BaseException], ...],
    must_reject: str | None = None,
    check: Callable[[Any], None] | None = None,
    time_limit: float = 60.0,
    trace_memory_mb: float | None = None,
    what: str = "",
) -> tuple[bool, Any]:
    """Run one fuzz input through a reader: ``(True, result)`` when accepted (after ``check(result)``),
    ``(False, error)`` when rejected with one of ``errors``. Anything else fails the test: another exception
    (a crash), an empty message, acceptance when ``must_reject`` says why it must fail, an oracle failure,
    more than ``time_limit`` seconds, or (with ``trace_memory_mb``) a larger traced allocation peak."""
    s = STATS.setdefault(reader, Stats())
    s.tried += 1
    rss = _maxrss_mb()
    if trace_memory_mb is not None:
        tracemalloc.start()
    start = time.perf_counter()
    outcome: tuple[bool, Any]
    try:
        outcome = (True, call())
    except errors as exc:
        outcome = (False, exc)
    except Exception as exc:
        s.crashes += 1
        raise AssertionError(
            f"{reader}: crash outside our error type on {what}: {type(exc).__name__}: {str(exc)[:500]}"
        ) from exc
    finally:
        elapsed = time.perf_counter() - start
        peak = 0.0
        if trace_memory_mb is not None:
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        s.max_seconds = max(s.max_seconds, elapsed)
        s.max_traced_mb = max(s.max_traced_mb, peak)
        s.maxrss_growth_mb = max(s.maxrss_growth_mb, _maxrss_mb() - rss)
    assert elapsed < time_limit, f"{reader}: {elapsed:.1f}s on {what} (limit {time_limit}s)"
    if trace_memory_mb is not None:
        assert peak < trace_memory_mb, f"{reader}: allocated {peak:.0f} MB on {what} (limit {trace_memory_mb} MB)"
    accepted, value = outcome
    if not accepted:
        message = str(value)
        assert message.strip(), f"{reader}: {type(value).__name__} without a message on {what}"
        s.rejected += 1
        key = type(value).__name__
        s.errors[key] = s.errors.get(key, 0) + 1
        return outcome
    try:
        if must_reject:
            raise SilentLoad(f"{reader}: accepted {what}, which must be refused ({must_reject})")
        if check is not None:
            check(value)
    except AssertionError as exc:
        s.silent += 1
        raise SilentLoad(f"{reader}: silent load of {what}: {exc}") from exc
    s.accepted += 1
    return outcome


def summary_lines() -> list[str]:
    lines = []
    for reader in sorted(STATS):
        s = STATS[reader]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items()))
        lines.append(
            f"{reader}: {s.tried} inputs, {s.rejected} rejected ({errors or 'none'}), {s.accepted} accepted and "
            f"verified, {s.crashes} crashes, {s.silent} silent loads; slowest {s.max_seconds:.2f}s"
            + (f", traced peak {s.max_traced_mb:.1f} MB" if s.max_traced_mb else "")
            + f", max RSS growth {s.maxrss_growth_mb:.0f} MB"
        )
    return lines


def write_report(path: str) -> None:
    data = {reader: vars(s) for reader, s in sorted(STATS.items())}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)


# ----------------------------------------------------------------------------- byte mutations

#: integers that break readers: boundaries of the integer widths, sizes far beyond any file, small values
INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    31,
    32,
    33,
    63,
    64,
    127,
    128,
    255,
    256,
    1023,
    4096,
    2**15 - 1,
    2**15,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**53 + 1,
    2**60,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
)


@dataclass(frozen=True)
class Slot:
    """An integer field of a file: byte ``offset``, ``size`` bytes, little-endian, and what it is."""

    offset: int
    size: int
    name: str


def byte_mutation(length: int, hot: tuple[int, int] | None = None, slots: tuple[Slot, ...] = ()):
    """A strategy of mutations of a ``length``-byte file, as printable tuples (see `apply_bytes`). Positions
    fall in ``hot`` (the header) most of the time; ``slots`` are integer fields to overwrite with
    `INTERESTING_INTS` (and values near their own)."""
    lo, hi = hot if hot is not None else (0, length)
    hi = max(hi, lo + 1)
    position = st.one_of(st.integers(lo, hi - 1), st.integers(lo, hi - 1), st.integers(0, max(length - 1, 0)))
    kinds = [
        st.tuples(st.just("truncate"), st.one_of(st.integers(0, max(length - 1, 0)), st.integers(lo, hi))),
        st.tuples(st.just("flip"), st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=3)),
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("zero-tail"), st.integers(0, max(length - 1, 0))),
    ]
    if slots:
        value = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, 2**64 - 1), st.integers(-8, 8))
        kinds.append(st.tuples(st.just("slot"), st.sampled_from(slots), value))
        kinds.append(st.tuples(st.just("slot"), st.sampled_from(slots), value))  # twice as likely
    return st.one_of(kinds)


def apply_bytes(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: mutation[1]])
    if kind == "flip":
        for pos, bit in mutation[1]:
            if pos < len(buf):
                buf[pos] ^= 1 << bit
        return bytes(buf)
    if kind == "set":
        if mutation[1] < len(buf):
            buf[mutation[1]] = mutation[2]
        return bytes(buf)
    if kind == "insert":
        return bytes(buf[: mutation[1]] + mutation[2] + buf[mutation[1] :])
    if kind == "delete":
        return bytes(buf[: mutation[1]] + buf[mutation[1] + mutation[2] :])
    if kind == "append":
        return bytes(buf) + mutation[1]
    if kind == "zero-tail":
        return bytes(buf[: mutation[1]]) + bytes(len(buf) - mutation[1])
    if kind == "slot":
        slot, value = mutation[1], mutation[2]
        old = int.from_bytes(buf[slot.offset : slot.offset + slot.size], "little")
        if -8 <= value <= 8:
            value = old + value  # near the field's own value
        value %= 2 ** (8 * slot.size)
        buf[slot.offset : slot.offset + slot.size] = value.to_bytes(slot.size, "little")
        return bytes(buf)
    raise ValueError(kind)


def changed_range(original: bytes, mutated: bytes) -> tuple[int, int] | None:
    """``[first, last]`` byte positions where two equally long files differ (``None``: identical)."""
    diff = [i for i, (a, b) in enumerate(zip(original, mutated)) if a != b]
    return (diff[0], diff[-1]) if diff else None


def mutated_positions(data_len: int, mutation: tuple) -> tuple[int, int] | None:
    """The byte range ``[first, last]`` of the original a mutation may change (``None``: only appends);
    for mutations that keep the length, `changed_range` gives the exact range."""
    kind = mutation[0]
    if kind in ("truncate", "zero-tail"):
        return (mutation[1], data_len - 1) if mutation[1] < data_len else None
    if kind == "flip":
        ps = [p for p, _ in mutation[1] if p < data_len]
        return (min(ps), max(ps)) if ps else None
    if kind == "set":
        return (mutation[1], mutation[1]) if mutation[1] < data_len else None
    if kind in ("insert", "delete"):
        return (mutation[1], data_len - 1) if mutation[1] < data_len else None
    if kind == "slot":
        return (mutation[1].offset, mutation[1].offset + mutation[1].size - 1)
    return None  # append


# ----------------------------------------------------------------------------- JSON mutations

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
WEIRD_STRINGS = (
    "",
    " ",
    "null",
    "4",
    "4.0",
    "-1",
    "true",
    "../model.safetensors",
    "/etc/passwd",
    "x.safetensors",
    "model.safetensors",
    "re:(",
    "re:.*",
    "(",
    "[",
    "*",
    ".*",
    "\x00",
    "\ud7ff",
    "é" * 3,
    "F16",
    "BF16",
    "F32",
    "I32",
    "I64",
    "U8",
    "F4",
    "float16",
    "int32",
    "gptq",
    "gptq_v2",
    "awq",
    "gemm",
    "gemv",
    "marlin",
    "compressed-tensors",
    "pack-quantized",
    "naive-quantized",
    "float-quantized",
    "group",
    "channel",
    "tensor",
    "block",
    "int",
    "float",
    "Linear",
    "llama",
    "hf_efficiency",
    "rtn",
    "awq",
    "hqq",
    "mse",
    "none",
    "dynamic",
    "static",
    "int4",
    "early-exit:0",
    "early-exit:99999999999999999999",
    "int4-g7",
    "ngram",
    "eager",
    "sdpa",
    "hf_efficiency_flash",
    "bitfit",
    "freeze",
    "adapters",
    "kjv",
    "x" * 300,
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from((4.0, 8.0, 2.0, 0.5, -1.0, 0.0, -0.0, 1e-300, 1e308, 99.99, 0.01, 1.5)),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTERESTING_INTS),
    st.sampled_from(INTERESTING_INTS).map(lambda v: -v),
    st.integers(),
    FLOATS,
    st.sampled_from(WEIRD_STRINGS),
    _TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=12,
)


def near_value(original: Any):
    """A strategy of values related to ``original`` (same type, nearby, boundary) or anything JSON."""
    options = [JSON_VALUES]
    if isinstance(original, bool):
        options += [st.booleans(), st.sampled_from((0, 1, "true", "false", None))]
    elif isinstance(original, int):
        options += [
            st.integers(original - 3, original + 3),
            st.sampled_from(INTERESTING_INTS),
            st.just(float(original)),
            st.just(str(original)),
            st.just(-original),
        ]
    elif isinstance(original, float):
        options += [FLOATS, st.just(int(original)) if original == original and abs(original) < 1e18 else FLOATS]
    elif isinstance(original, str):
        options += [st.sampled_from(WEIRD_STRINGS), _TEXT, st.just(original.upper()), st.just(original + "x")]
    elif isinstance(original, list):
        item = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-3, 300), SCALARS)
        options += [
            st.lists(item, min_size=0, max_size=max(len(original) + 2, 3)),
            st.just(original[:-1]),
            st.just(original + original[-1:]),
            st.just(list(reversed(original))),
        ]
    return st.one_of(options)


def json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) inside a JSON document, the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += json_paths(v, prefix + (i,))
    return out


def get_path(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def json_mutation(draw, doc: Any, paths: list[tuple] | None = None):
    """A printable edit of a JSON document: ``(op, path, value)`` with op ``replace``, ``delete``, ``add``,
    ``rename`` or ``duplicate`` (a repeated object key, applied in the text)."""
    paths = paths if paths is not None else json_paths(doc)
    path = draw(st.sampled_from(paths))
    target = get_path(doc, path)
    ops = ["replace", "replace", "replace"]
    if path:
        ops += ["delete"]
        if isinstance(path[-1], str):
            ops += ["rename", "duplicate"]
    if isinstance(target, (dict, list)):
        ops += ["add"]
    op = draw(st.sampled_from(ops))
    if op == "replace":
        return ("replace", path, draw(near_value(target)))
    if op == "delete":
        return ("delete", path, None)
    if op == "rename":
        return ("rename", path, draw(st.one_of(st.sampled_from(WEIRD_STRINGS), _TEXT)))
    if op == "duplicate":
        return ("duplicate", path, draw(near_value(target)))
    key = draw(_TEXT) if isinstance(target, dict) else None
    return ("add", path, (key, draw(JSON_VALUES)))


class _Dup:
    """Marker replaced by a duplicated key in the JSON text."""


def apply_json(doc: Any, mutation: tuple) -> str:
    """The JSON text of ``doc`` after ``mutation`` (``doc`` itself is not modified)."""
    op, path, value = mutation
    doc = json.loads(json.dumps(doc))
    if op == "replace" and not path:
        return json.dumps(value)
    parent = get_path(doc, path[:-1]) if path else None
    last = path[-1] if path else None
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "rename":
        items = list(parent.items())
        parent.clear()
        for k, v in items:
            parent[value if k == last else k] = v
    elif op == "add":
        target = get_path(doc, path)
        key, new = value
        if isinstance(target, dict):
            target[key] = new
        else:
            target.append(new)
    elif op == "duplicate":
        marker = "__hf_efficiency_fuzz_duplicate__"
        items = list(parent.items())
        parent.clear()
        for k, v in items:
            if k == last:
                parent[marker] = value
            parent[k] = v
        return json.dumps(doc).replace(json.dumps(marker), json.dumps(last), 1)
    return json.dumps(doc)


# ----------------------------------------------------------------------------- safetensors helpers


def safetensors_parts(data: bytes) -> tuple[dict, int]:
    """``(header dict, header length n)`` of a valid safetensors file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), n


def with_header(data: bytes, header_text: str, length_delta: int = 0) -> bytes:
    """A safetensors file with the header replaced by ``header_text`` (the length prefix adjusted by
    ``length_delta``), the original tensor data after it."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + data[8 + n :]


def tensor_at(header: dict, n: int, position: int) -> str | None:
    """The tensor whose data holds byte ``position`` of the file (``None``: the length prefix or header)."""
    rel = position - 8 - n
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][0] <= rel < entry["data_offsets"][1]:
            return name
    return None


def changed_tensors(original: bytes, mutated: bytes) -> set[str | None]:
    """The tensors of a safetensors file whose data bytes differ between two equally long versions; ``None``
    stands for a change of the header itself (a change inside ``__metadata__`` only is no change of structure)."""
    header, n = safetensors_parts(original)
    hit: set[str | None] = set()
    header_changed = False
    for i, (a, b) in enumerate(zip(original, mutated)):
        if a != b:
            name = tensor_at(header, n, i)
            if name is None:
                header_changed = True
            else:
                hit.add(name)
    if header_changed:
        try:
            new_header, new_n = safetensors_parts(mutated)
        except ValueError:  # not JSON any more (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            new_header, new_n = None, None
        entries = lambda h: {k: v for k, v in h.items() if k != "__metadata__"} if isinstance(h, dict) else h
        if new_n != n or entries(new_header) != entries(header):
            hit.add(None)
    return hit
