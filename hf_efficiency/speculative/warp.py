"""The generation's logits processors applied to speculative scores.

Plain decoding calls ``processors(input_ids, scores)`` once per step for the whole batch. Here each
verified position of each row has its own token prefix (rows advance by different amounts), so
processors that read the prefix (repetition penalty, minimum length, no-repeat n-grams, ...) are
applied row by row with the row's real tokens. Processors known to ignore the prefix (temperature,
top-k, top-p, min-p, typical, epsilon/eta, suppress tokens) run once on all rows and positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _prefix_free_types() -> tuple[type, ...]:
    from transformers.generation import logits_process as lp

    names = (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "SuppressTokensLogitsProcessor",
        "LogitNormalization",
        "TopHLogitsWarper",
    )
    return tuple(getattr(lp, n) for n in names if hasattr(lp, n))


class RowWarp:
    """``warp(scores [N, V], prefixes)``: ``prefixes`` is a callable giving each row's tokens so far
    (only called when some processor reads them)."""

    def __init__(self, processors) -> None:
        self.processors = processors
        free = _prefix_free_types()
        self.per_row = any(type(p) not in free for p in processors)

    def __call__(self, scores: Tensor, prefixes: Callable[[], list[Tensor]]) -> Tensor:
        if not self.per_row:
            dummy = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
            return self.processors(dummy, scores)
        rows = prefixes()
        return torch.cat([self.processors(p[None], scores[b : b + 1]) for b, p in enumerate(rows)], dim=0)


def row_warp(processors) -> RowWarp | None:
    """A `RowWarp` over a ``LogitsProcessorList``, or ``None`` when it is empty."""
    return RowWarp(processors) if processors else None
