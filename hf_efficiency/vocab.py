"""Vocabulary agreement between two tokenizers (distillation and speculative decoding compare
distributions position by position over one shared set of token ids)."""

from __future__ import annotations

from typing import Any


def tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer inside a processor, or the object itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def vocabulary_difference(a: Any, b: Any) -> str | None:
    """``None`` when both tokenizers map every token to the same id, else a sentence counting the
    differences (with examples) between ``a`` (first) and ``b`` (second)."""
    av, bv = tokenizer_of(a).get_vocab(), tokenizer_of(b).get_vocab()
    if av == bv:
        return None
    differ = [tok for tok in av.keys() & bv.keys() if av[tok] != bv[tok]]
    only_a, only_b = len(av.keys() - bv.keys()), len(bv.keys() - av.keys())
    return (
        f"{len(differ)} shared tokens have different ids, {only_a} tokens exist only in the first and "
        f"{only_b} only in the second vocabulary (e.g. {sorted(differ)[:3] or sorted(av.keys() ^ bv.keys())[:3]})"
    )


def check_same_vocabulary(first: Any, second: Any, *, names: tuple[str, str], hint: str) -> None:
    """Raise ``ValueError`` naming ``names`` when the tokenizers differ; a ``None`` side skips the check."""
    if first is None or second is None or tokenizer_of(first) is None or tokenizer_of(second) is None:
        return
    diff = vocabulary_difference(first, second)
    if diff is not None:
        diff = diff.replace("the first", f"the {names[0]}'s").replace("the second", f"the {names[1]}'s")
        raise ValueError(f"The {names[0]} and {names[1]} tokenizers differ: {diff}. {hint}")
