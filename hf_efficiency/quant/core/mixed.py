"""Mixed precision: per-module bit widths by pattern, and an automatic allocation that meets a
target mean width by measured sensitivity (pure functions; no model code)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...config import QuantizationSpec


def module_matches(name: str, pattern: str) -> bool:
    """``pattern`` is the full module name, a ``.``-suffix of it, or a regex matching all of it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def bits_for_module(name: str, spec: QuantizationSpec) -> int:
    """The width of module ``name``: the first matching ``module_bits`` pattern, else ``spec.bits``."""
    for pattern, bits in (spec.module_bits or {}).items():
        if module_matches(name, pattern):
            return bits
    return spec.bits


def allocate_bits(
    sizes: dict[str, int],
    errors: dict[str, dict[int, float]],
    choices: list[int],
    target_bits: float,
) -> dict[str, int]:
    """Choose a width per module so that ``sum(bits * size) <= target_bits * sum(size)``.

    Greedy marginal analysis: every module starts at the smallest choice; the upgrade (to the
    next larger choice) with the largest error reduction per added bit is applied while it fits
    the budget. ``errors[name][bits]`` is the module's measured quantization error at ``bits``
    (any additive measure, e.g. activation-weighted squared weight error).
    """
    choices = sorted(choices)
    total = sum(sizes.values())
    budget = target_bits * total + 1e-6
    alloc = {name: choices[0] for name in sizes}
    used = choices[0] * total
    while True:
        best, best_gain = None, -1.0
        for name, size in sizes.items():
            pos = choices.index(alloc[name])
            if pos + 1 == len(choices):
                continue
            nxt = choices[pos + 1]
            cost = (nxt - alloc[name]) * size
            if used + cost > budget:
                continue
            gain = (errors[name][alloc[name]] - errors[name][nxt]) / cost
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return alloc
        used += (choices[choices.index(alloc[best]) + 1] - alloc[best]) * sizes[best]
        alloc[best] = choices[choices.index(alloc[best]) + 1]


def mean_bits(alloc: dict[str, int], sizes: dict[str, int]) -> float:
    """Parameter-weighted mean code width of an allocation."""
    total = sum(sizes[n] for n in alloc)
    return sum(alloc[n] * sizes[n] for n in alloc) / total
