"""Text sources for calibration and evaluation: files, ``datasets``, lists of strings and named corpora.

Nothing here quantizes anything or knows a model. A named corpus (``"kjv"``) is looked up in
:data:`NAMED_CORPORA`, a table of ``name -> (module, text function, describe function)`` imported on
first use; the KJV corpus itself lives in `hf_efficiency.demo` with the bundled demo model.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

#: name -> (module, function(split) -> text, function(split) -> report name); imported on first use.
NAMED_CORPORA: dict[str, tuple[str, str, str]] = {"kjv": ("hf_efficiency.demo", "kjv_text", "describe_kjv")}

_ACCEPTED_SOURCES = (
    f"{', '.join(map(repr, NAMED_CORPORA))}, a path to a text file, a datasets.Dataset with a "
    "'text' column, 'datasets:NAME[:CONFIG]:SPLIT', or a list/tuple of strings"
)


#: A JSON file a converted model folder may carry, recording where its weights came from
#: (``{"base_model": ...}``); model cards read its ``base_model``.
SOURCE_FILE = "hf_efficiency_source.json"


def source_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Contents of ``hf_efficiency_source.json`` in a model folder (``{}`` if absent)."""
    path = Path(folder) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def base_model_of(name_or_path: str | None) -> str | None:
    """The Hub id a model came from: ``base_model`` of ``hf_efficiency_source.json`` in a local
    folder (the bundled model writes one), else the name itself when it is not a local path."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return source_info(name_or_path).get("base_model")
    return name_or_path


def _named_corpus(name: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    module, text, describe = NAMED_CORPORA[name]
    mod = importlib.import_module(module)
    return getattr(mod, text), getattr(mod, describe)


def _join_dataset(ds: Any) -> str:
    cols = list(getattr(ds, "column_names", None) or [])
    if "text" not in cols:
        raise ValueError(f"Dataset has no 'text' column (columns: {cols})")
    return "\n".join(ds["text"])


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def load_text(source: Any, split: str = "evaluation") -> str:
    """Resolve a text source to one string.

    ``source`` is a corpus name of :data:`NAMED_CORPORA` (``"kjv"``: its ``split`` slice), a path to a UTF-8 text
    file, a ``datasets.Dataset`` (its ``"text"`` column), ``"datasets:NAME[:CONFIG]:SPLIT"``
    (loaded with ``datasets.load_dataset``) or a list/tuple of strings; pieces are joined
    with ``"\\n"``. ``split`` only applies to named corpora.
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise ValueError("A list/tuple text source must contain only strings")
        return "\n".join(source)
    if _is_hf_dataset(source):
        return _join_dataset(source)
    if isinstance(source, str) and source.lower() in NAMED_CORPORA:
        return _named_corpus(source.lower())[0](split)
    if isinstance(source, str) and source.startswith("datasets:"):
        parts = source[len("datasets:") :].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"Bad dataset spec {source!r}; use 'datasets:NAME[:CONFIG]:SPLIT'")
        try:
            import datasets
        except ImportError as e:
            raise ImportError(
                f"Text source {source!r} needs the optional `datasets` package: pip install datasets"
            ) from e
        name, config, ds_split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        return _join_dataset(datasets.load_dataset(name, config, split=ds_split))
    if isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.isfile(source)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        return read_text_file(path)
    raise ValueError(f"Unknown text source {source!r} (type {type(source).__name__}); expected {_ACCEPTED_SOURCES}")


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 text is a ``ValueError`` naming it and the first bad
    byte (a calibration or evaluation file must be plain text)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        kind = "a binary file" if b"\x00" in data[:8192] else "not UTF-8 text"
        raise ValueError(
            f"text file {os.fspath(path)!r} is {kind}: byte 0x{data[exc.start]:02x} at offset {exc.start} is not "
            "valid UTF-8; give a plain-text file (UTF-8), e.g. one document per line"
        ) from None


def token_windows(tokenizer: Any, text: str, window: int = 512, num_tokens: int | None = 16384) -> torch.LongTensor:
    """Tokenize ``text`` once (no special tokens) into ``[n_windows, window]`` non-overlapping
    windows over its first ``num_tokens`` tokens (all tokens if ``None``); the remainder is
    dropped."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")

    def encode(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]

    ids: list[int] | None = None
    if num_tokens is not None and len(text) > 32 * (num_tokens + 64):
        # Huge text: tokenize a generous prefix only; the margin keeps the cut-off boundary
        # token (possibly split differently) beyond the tokens we keep.
        ids = encode(text[: 32 * (num_tokens + 64)])
        ids = ids if len(ids) >= num_tokens + 64 else None
    if ids is None:
        ids = encode(text)
    n = len(ids) if num_tokens is None else min(len(ids), num_tokens)
    n_windows = n // window
    if n_windows == 0:
        raise ValueError(
            f"Text has only {len(ids)} tokens (num_tokens={num_tokens}); need at least one full window of {window}"
        )
    return torch.tensor(ids[: n_windows * window], dtype=torch.long).view(n_windows, window)


def describe_text_source(source: Any, split: str = "evaluation") -> str:
    """Short human-readable name of a text source, for reports."""
    if isinstance(source, (list, tuple)):
        return f"<{len(source)} strings>"
    if _is_hf_dataset(source):
        return f"<datasets.Dataset {len(source)} rows>"
    if isinstance(source, str) and source.lower() in NAMED_CORPORA:
        try:
            return _named_corpus(source.lower())[1](split)
        except (KeyError, ValueError):
            return source
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


__all__ = [
    "NAMED_CORPORA",
    "SOURCE_FILE",
    "base_model_of",
    "source_info",
    "describe_text_source",
    "load_text",
    "token_windows",
]
