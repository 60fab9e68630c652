"""Saves that cannot mix: every folder we write holds one complete save or fails to load, never a mix.

A save is written into a *staging* folder beside the destination (same file system, so moves are renames)
and then published: the weight files of any earlier save are removed from the destination first, the new
files are moved in, and the weight index comes last. A save killed before publishing leaves the destination
untouched (and a hidden staging folder, removed by the next save into the same destination); one killed while
publishing leaves no complete set of weights, so loading fails instead of reading a mix. Every shard and the
index carry one save id (``hf_efficiency_save_id``) that loading checks, which also catches mixes made by
other means (copying shards of two saves into one folder).

Used by ``save_pretrained`` of our models, every export writer and the command line's ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

from transformers.utils import logging

logger = logging.get_logger(__name__)

#: safetensors metadata / index metadata key holding the id shared by all files of one save
SAVE_ID_KEY = "hf_efficiency_save_id"

#: weight files (and their indexes) of a transformers-style save: ``model.safetensors``,
#: ``model-00001-of-00003.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``, variants
#: (``model.fp16.safetensors``) included; adapters (``adapter_model.safetensors``) and other files are not
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(\.[\w-]+)?(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
_STAGING = ".{name}.saving-"
_OLD = ".{name}.replaced-"


class OutputExistsError(FileExistsError):
    """The output folder exists and holds files; the command refuses to write into it without ``--overwrite``."""


def new_save_id() -> str:
    """A fresh id for one save."""
    return uuid.uuid4().hex


def is_weight_file(filename: str) -> bool:
    """Whether ``filename`` (a base name) is a weight file or weight index of a transformers-style save."""
    return WEIGHT_FILE.match(filename) is not None


#: a staging folder of another process is left alone unless that process is gone (same host) or it is this old
_ABANDONED_AFTER_S = 6 * 3600


def _staging_name(pattern: str, name: str) -> str:
    """``.<name>.saving-<host>-<pid>-<random>``: the owner is recorded so that only abandoned folders are removed."""
    host = socket.gethostname().replace("-", "_")[:32]
    return pattern.format(name=name) + f"{host}-{os.getpid()}-{new_save_id()[:8]}"


def _abandoned(path: str, prefix: str) -> bool:
    """Whether the staging folder ``path`` was left by a process that is gone: same host and its pid not alive,
    or older than `_ABANDONED_AFTER_S` (another host, or a name without an owner)."""
    try:
        if time.time() - os.path.getmtime(path) > _ABANDONED_AFTER_S:
            return True
    except OSError:
        return False
    host, _, rest = os.path.basename(path)[len(prefix) :].partition("-")
    pid = rest.partition("-")[0]
    if host != socket.gethostname().replace("-", "_")[:32] or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _siblings(out_dir: str, pattern: str) -> list[str]:
    """Abandoned staging (or replaced) folders of earlier saves into ``out_dir``."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    prefix = pattern.format(name=name)
    try:
        found = [os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefix)]
    except FileNotFoundError:
        return []
    return [p for p in found if _abandoned(p, prefix)]


@contextlib.contextmanager
def _staging_folder(out_dir: str, *abandoned: str) -> Iterator[str]:
    """Yield a new staging folder beside ``out_dir`` (an absolute path), after removing abandoned folders of the
    ``abandoned`` kinds left by earlier saves; the folder is removed if the block raises."""
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    for pattern in abandoned:
        for stale in _siblings(out_dir, pattern):
            shutil.rmtree(stale, ignore_errors=True)
    staging = os.path.join(parent, _staging_name(_STAGING, name))
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_save(out_dir: str | os.PathLike) -> Iterator[str]:
    """Yield a staging folder beside ``out_dir``; write the save there. On leaving the block without an error
    the save is published into ``out_dir`` (`publish`); on an error the staging folder is removed and
    ``out_dir`` is left as it was."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    with _staging_folder(out_dir, _STAGING) as staging:
        yield staging
    publish(staging, out_dir)


def _weight_order(filename: str) -> int:
    """Publishing order: weight files first, other files next, weight indexes last."""
    if filename.endswith(".index.json"):
        return 2
    return 0 if is_weight_file(filename) else 1


def publish(staging: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Move everything in ``staging`` into ``out_dir`` (created if needed) and remove ``staging``. The weight
    files of an earlier save in ``out_dir`` are removed before anything moves, and a new weight index moves
    last, so no moment leaves a loadable mix. Files that are not weights (a tokenizer saved earlier, a README)
    stay unless the new save replaces them. Returns the names published."""
    staging, out_dir = os.fspath(staging), os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(staging), key=lambda n: (_weight_order(n), n))
    if any(is_weight_file(n) for n in names):
        for old in os.listdir(out_dir):
            path = os.path.join(out_dir, old)
            if is_weight_file(old) and os.path.isfile(path):
                os.remove(path)
                logger.info(f"removed {old} of an earlier save in {out_dir}")
    for n in names:
        src, dst = os.path.join(staging, n), os.path.join(out_dir, n)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    shutil.rmtree(staging, ignore_errors=True)
    return names


def stamp_index(folder: str | os.PathLike, save_id: str) -> None:
    """Record ``save_id`` in the metadata of every weight index in ``folder`` (rewritten through a rename)."""
    folder = os.fspath(folder)
    for n in os.listdir(folder):
        if is_weight_file(n) and n.endswith(".index.json"):
            path = os.path.join(folder, n)
            with open(path, encoding="utf-8") as fh:
                index = json.load(fh)
            index.setdefault("metadata", {})[SAVE_ID_KEY] = save_id
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that exists and is not empty unless ``overwrite`` (the command line's ``--out``)."""
    out_dir = os.fspath(out_dir)
    if os.path.isfile(out_dir):
        raise OutputExistsError(f"--out {out_dir!r} is a file; give a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        shown = sorted(os.listdir(out_dir))
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise OutputExistsError(
            f"--out {out_dir!r} exists and is not empty ({', '.join(shown[:5])}{more}); choose a new folder or "
            "pass --overwrite to replace it"
        )


@contextlib.contextmanager
def replaced_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """For a command's ``--out``: yield a staging folder to write the whole output into; on success it replaces
    ``out_dir`` as a whole (the old folder is renamed aside, the new one renamed in, the old one removed), so
    no file of an earlier output survives. ``out_dir`` must be absent or empty unless ``overwrite``."""
    prepare_output_dir(out_dir, overwrite)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    with _staging_folder(out_dir, _STAGING, _OLD) as staging:
        yield staging
    old = None
    if os.path.exists(out_dir):
        old = os.path.join(parent, _staging_name(_OLD, name))
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "SAVE_ID_KEY",
    "OutputExistsError",
    "is_weight_file",
    "new_save_id",
    "prepare_output_dir",
    "publish",
    "replaced_output_dir",
    "stamp_index",
    "staged_save",
]
