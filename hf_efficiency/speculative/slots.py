"""The token layout shared by the target and a model draft during batched speculative decoding.

Rows accept different numbers of drafted tokens per step. Instead of shifting every row's cache,
all rows share one slot axis: ``ids [B, L]`` with ``mask [B, L]`` marking each row's real tokens.
A row that accepted fewer tokens than the longest row of a step keeps its rejected slots as masked
holes; positions come from the mask (``cumsum - 1``), so every row computes exactly what it would
alone. Both models' KV caches are indexed by slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def left_pad(rows: list[Tensor], pad_token_id: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[B, max_len]`` from 1-D token tensors, left-padded (the layout
    speculative decoding and transformers' batched generation expect)."""
    width = max(r.numel() for r in rows)
    device = device if device is not None else rows[0].device
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
    return ids, mask


def positions_of(mask: Tensor) -> Tensor:
    """Position id of every slot: the number of real tokens before it in its row."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Slots:
    """Every row's tokens so far: ``ids [B, L]`` and ``mask [B, L]`` (True = a real token) on the
    models' device, and ``host``: each row's real tokens as Python ints (what the bookkeeping reads,
    so that it does not wait on the device token by token)."""

    ids: Tensor
    mask: Tensor
    host: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.host:
            self.host = [r[m].tolist() for r, m in zip(self.ids.cpu(), self.mask.cpu())]

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def rows(self) -> list[Tensor]:
        """Each row's real tokens as a 1-D tensor on the device."""
        return [torch.tensor(h, dtype=self.ids.dtype, device=self.ids.device) for h in self.host]

    def append(self, ids: Tensor, mask: Tensor, host_tokens: list[list[int]]) -> None:
        """Add slots (``ids``/``mask`` ``[B, n]``) and each row's new real tokens."""
        self.ids = torch.cat([self.ids, ids], dim=1)
        self.mask = torch.cat([self.mask, mask], dim=1)
        for h, new in zip(self.host, host_tokens):
            h.extend(new)


def forward_slots(model: nn.Module, cache, ids: Tensor, mask: Tensor, keep: int) -> Tensor:
    """Run the slots after what ``cache`` holds: ``ids`` are the new slots' tokens, ``mask`` the mask of
    all slots including them. Returns the float logits of the last ``keep`` slots ``[B, keep, V]``."""
    past = cache.get_seq_length()
    if past + ids.shape[1] != mask.shape[1]:
        raise RuntimeError(f"slot bookkeeping broke: cache {past} + new {ids.shape[1]} != mask {mask.shape[1]}")
    positions = positions_of(mask)[:, past:]
    out = model(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits[:, -keep:].float()


def rollback_cache(cache):
    """Make ``cache`` able to drop rejected tokens: sliding-window layers (Mistral, Gemma 2/3, ...) keep their
    past until the next `crop_cache` instead of discarding it at the window. Returns the cache."""
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def crop_cache(cache, length: int) -> None:
    """Drop cached slots beyond ``length`` (transformers 5 crops by a negative count); ``crop(0)`` also trims
    sliding-window layers that recorded their past back to the window."""
    extra = cache.get_seq_length() - length
    cache.crop(-extra if extra > 0 else 0)
