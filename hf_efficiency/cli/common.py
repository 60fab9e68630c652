"""What several commands share: model loading, the evaluation-text flags, argparse types, and flags
generated from the fields of a dataclass (method options, memory scenario)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def group_size(value: str) -> int | None:
    """argparse type of ``--group-size``: an integer, or none / channel / -1 for per channel."""
    if value.lower() in ("none", "channel", "-1"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {value!r}") from None


def add_out_arguments(p: argparse.ArgumentParser) -> None:
    """``--out`` (a folder written as a whole: refused when it exists and is not empty) and ``--overwrite``."""
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder as a whole (the new folder is written beside it, then renamed in)",
    )


def add_text_args(p: argparse.ArgumentParser) -> None:
    """The evaluation-text flags of `eval` and `quantize --eval`."""
    p.add_argument(
        "--text",
        default="kjv",
        help="evaluation text: 'kjv' (bundled King James Bible, fixed evaluation slice), a text file path, "
        "or 'datasets:NAME[:CONFIG]:SPLIT' (default: kjv)",
    )
    p.add_argument("--text-file", default=None, help="a UTF-8 text file to evaluate on (same as --text PATH)")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default: 512)")
    p.add_argument(
        "--num-tokens", type=int, default=16384, help="tokens of evaluation text, split in windows (default: 16384)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")


def load(model_path: str, **kwargs: Any):
    """``(model, tokenizer)`` from a folder or Hub id, float32 unless ``dtype=`` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_efficiency  # noqa: F401  (registration)

    kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.eval()
    return model, tokenizer


def evaluate(model, tokenizer, args: argparse.Namespace, model_dir: str | None, speed: bool = True):
    """The shared harness on the text the evaluation-text flags name."""
    from ..evaluate import evaluate as run_harness

    return run_harness(
        model,
        tokenizer,
        text=args.text_file if args.text_file else args.text,
        window=args.window,
        num_tokens=args.num_tokens,
        batch_size=args.batch_size,
        speed=speed,
        model_dir=model_dir,
    )


def protocol(result) -> str:
    return f"{result.text_source}, {result.n_windows} windows x {result.window} tokens"


# --- flags from dataclass fields ------------------------------------------------------------
def _argument_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """(argparse type, Literal choices, is a list) of a field's type hint."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = str if len(args) != 1 and str in args else args[0]
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, False
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        return (inner[0] if inner and isinstance(inner[0], type) else str), None, True
    return (hint if hint in (bool, int, float, str) else str), None, False


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    given_only: bool = False,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, str]:
    """One flag per field of dataclass ``cls``: ``--{prefix}{field-with-dashes}``, its help and
    choices from the field's ``metadata``; ``bool`` fields are switches (``--no-...`` when the
    default is ``True``). With ``given_only`` every default is ``None`` so that only what the
    command line gives is set. Returns ``{field name: argparse dest}``."""
    hints = typing.get_type_hints(cls)
    dests: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        name = prefix + f.name.replace("_", "-")
        dest = name.replace("-", "_")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        kind, choices, many = _argument_type(hints[f.name])
        choices = f.metadata.get("choices", choices)
        help_text = f.metadata.get("help", "").replace("%", "%%")
        extra = list((aliases or {}).get(f.name, ()))
        if kind is bool:
            negate = default is True
            flag = f"--no-{name}" if negate else f"--{name}"
            parser.add_argument(
                flag,
                *extra,
                dest=dest,
                action="store_const",
                const=not negate,
                default=None if given_only else default,
                help=(f"turn off (on by default): {help_text}" if negate else help_text) or None,
            )
        else:
            parser.add_argument(
                f"--{name}",
                *extra,
                dest=dest,
                type=kind,
                choices=choices,
                nargs="+" if many else None,
                default=None if given_only else default,
                help=_with_default(help_text, default),
            )
        dests[f.name] = dest
    return dests


def _with_default(help_text: str, default: Any) -> str | None:
    if default is None or "default" in help_text:
        return help_text or None
    return f"{help_text} (default: {default})" if help_text else f"default: {default}"
