"""The batched draft-then-verify loop.

Each step: the draft proposes up to ``k`` tokens per row; the target scores every row's unseen slots
plus the proposals in one forward pass; each row keeps its longest accepted prefix plus one target
token (`verify.py`). Rows advance by different amounts; the slot layout of `slots.py` keeps one KV
cache per model for the whole batch, so every row computes what it would compute alone.

Invariant between steps: both caches hold at most ``slots.length - 1`` slots (the last emitted token
is fed at the next step). After verification both are cropped to the longest accepted prefix of the
step; shorter rows mask their rejected slots.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SpeculativeSpec
from .drafts import Drafter, build_drafter
from .slots import Slots, crop_cache, forward_slots, rollback_cache
from .verify import greedy_verify, sampling_verify
from .warp import row_warp


@dataclass
class SpeculativeStats:
    """What one speculative generation did.

    ``target_passes_per_token`` counts, per row, the target forward passes made while the row was
    generating over the tokens it emitted (batch 1: passes / new tokens); plain decoding is 1.0.
    """

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    row_passes: int = 0
    new_tokens: int = 0
    rows: int = 0
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    seconds: float = 0.0
    draft_lengths: list[int] = field(default_factory=list)
    accepted_per_step: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        """Drafted tokens a row keeps per target pass (the emitted tokens per pass are this plus one)."""
        return self.accepted / self.row_passes if self.row_passes else 0.0

    @property
    def target_passes_per_token(self) -> float:
        return self.row_passes / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "rows": self.rows,
            "target_passes": self.target_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_per_step": round(self.mean_accepted_per_step, 4),
            "target_passes_per_token": round(self.target_passes_per_token, 4),
            "seconds": round(self.seconds, 4),
            "draft_seconds": round(self.draft_seconds, 4),
            "target_seconds": round(self.target_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mean_draft_length": round(sum(self.draft_lengths) / len(self.draft_lengths), 3)
            if self.draft_lengths
            else 0.0,
        }


class DraftLength:
    """The number of tokens to draft next.

    ``"adaptive"``: keeps a decayed estimate of the per-token acceptance probability ``a`` (accepted
    tokens over accepted tokens plus rejections, the estimate of a geometric run length) and of the
    cost ratio ``r`` = one drafted token's time over one target pass's time, then picks the ``k`` in
    ``[1, max_draft_tokens]`` maximizing expected emitted tokens per unit of time,
    ``(1 - a^(k+1)) / (1 - a) / (1 + r k)``.
    """

    def __init__(self, spec: SpeculativeSpec, decay: float = 0.8) -> None:
        self.k = spec.num_draft_tokens
        self.k_max = spec.max_draft_tokens
        self.adaptive = spec.schedule == "adaptive"
        self.decay = decay
        self.accepted = 0.0
        self.rejections = 0.0
        self.ratio: float | None = None

    def update(
        self, accepted: list[int], offered: list[int], draft_seconds: float, target_seconds: float, drafted: int
    ) -> None:
        """Record one step: per live row, accepted and offered draft tokens; the step's draft and target
        times; ``drafted`` = the step's draft length."""
        if not self.adaptive or drafted == 0:
            return
        self.accepted = self.decay * self.accepted + sum(accepted)
        self.rejections = self.decay * self.rejections + sum(a < o for a, o in zip(accepted, offered))
        r = (draft_seconds / drafted) / max(target_seconds, 1e-9)
        self.ratio = r if self.ratio is None else self.decay * self.ratio + (1 - self.decay) * r
        a = min(self.accepted / max(self.accepted + self.rejections, 1e-9), 0.995)

        self.k = max(range(1, self.k_max + 1), key=lambda k: expected_tokens_per_pass(a, k) / (1 + self.ratio * k))


def _eos_list(eos_token_id: int | Iterable[int] | Tensor | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, Tensor):
        return [int(t) for t in eos_token_id.flatten().tolist()]
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _user_criteria(stopping_criteria) -> list:
    """Stopping criteria other than max length and eos (which the loop applies itself, exactly)."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    return [c for c in (stopping_criteria or []) if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]


def _stop_index(
    emitted: list[int], prefix: list[int], eos: list[int], criteria: list, device: torch.device
) -> int | None:
    """Index of the first emitted token after which the row stops (eos, or a user criterion)."""
    for i, tok in enumerate(emitted):
        if tok in eos:
            return i
        if criteria:
            ids = torch.tensor([prefix + emitted[: i + 1]], device=device)
            if any(bool(c(ids, None).any()) for c in criteria):
                return i
    return None


def _check_inputs(input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> Tensor:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
    if not bool(mask[:, -1].all()):
        raise ValueError(
            "the prompts are right-padded (attention_mask ends in 0 on some row); speculative decoding "
            "appends after the last slot: tokenize with padding_side='left'"
        )
    return mask


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: str | nn.Module | Drafter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    spec: SpeculativeSpec | None = None,
    num_draft_tokens: int | None = None,
    do_sample: bool = False,
    eos_token_id: int | Iterable[int] | Tensor | None = None,
    pad_token_id: int | None = None,
    logits_processor=None,
    stopping_criteria=None,
    generator: torch.Generator | None = None,
    streamer=None,
    tokenizer=None,
    draft_tokenizer=None,
) -> tuple[Tensor, SpeculativeStats]:
    """Generate up to ``max_new_tokens`` per row after ``input_ids [B, T]`` (left-padded, with
    ``attention_mask``) with ``draft`` proposing and ``target`` verifying.

    Greedy output equals the target's own greedy output row by row; sampled output follows the
    target's (warped) distribution. Returns ``[B, T + N]`` sequences (rows that stop early are padded
    with ``pad_token_id``) and the `SpeculativeStats`.
    """
    spec = spec or SpeculativeSpec()
    if num_draft_tokens is not None:
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        spec = SpeculativeSpec(
            **{
                **spec.to_dict(),
                "num_draft_tokens": num_draft_tokens,
                "max_draft_tokens": max(spec.max_draft_tokens, num_draft_tokens),
            }
        )
    mask = _check_inputs(input_ids, attention_mask, max_new_tokens)
    drafter = build_drafter(target, draft, spec, tokenizer=tokenizer, draft_tokenizer=draft_tokenizer)
    eos = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    warp = row_warp(logits_processor)
    criteria = _user_criteria(stopping_criteria)

    from transformers.cache_utils import DynamicCache

    from ..attention.kv_cache import saved_kv_cache

    start = time.perf_counter()
    b, device = input_ids.shape[0], input_ids.device
    slots = Slots(input_ids, mask)
    t_cache = rollback_cache(saved_kv_cache(target) or DynamicCache(config=getattr(target, "config", None)))
    drafter.reset()
    control = DraftLength(spec)
    # bookkeeping on the host: one transfer of the step's results instead of a sync per token
    active = [True] * b
    emitted_rows: list[list[int]] = [[] for _ in range(b)]
    stats = SpeculativeStats(rows=b)
    if streamer is not None:
        if b != 1:
            raise ValueError("streamer= supports batch size 1 (as in transformers)")
        streamer.put(input_ids.cpu())

    while any(active):
        t0 = time.perf_counter()
        limit = [min(control.k, max_new_tokens - len(e) - 1) if a else 0 for a, e in zip(active, emitted_rows)]
        k = max(limit)
        offered = [0] * b
        draft_tokens, q_probs = input_ids.new_zeros(b, 0), None
        if k > 0:
            proposal = drafter.propose(slots, k, warp=warp, do_sample=do_sample, generator=generator)
            offered = [min(n, lim) for n, lim in zip(proposal.lengths.tolist(), limit)]
            k = max(offered)
            draft_tokens = proposal.tokens[:, :k]
            q_probs = None if proposal.probs is None else proposal.probs[:, :k]
        t1 = time.perf_counter()

        past = t_cache.get_seq_length()
        ext_mask = torch.cat([slots.mask, slots.mask.new_ones(b, k)], dim=1)
        new_slots = torch.cat([slots.ids[:, past:], draft_tokens], dim=1)
        logits = forward_slots(target, t_cache, new_slots, ext_mask, keep=k + 1)
        if warp is not None:
            rows = slots.rows() if warp.per_row else []
            logits = torch.stack(
                [
                    warp(logits[:, i], lambda i=i: [torch.cat([p, draft_tokens[r, :i]]) for r, p in enumerate(rows)])
                    for i in range(k + 1)
                ],
                dim=1,
            )
        offered_t = torch.tensor(offered, dtype=torch.long, device=device)
        if do_sample:
            if q_probs is None:
                q_probs = logits.new_zeros(b, k, logits.shape[-1])
            accepted, nxt = sampling_verify(draft_tokens, q_probs, torch.softmax(logits, dim=-1), offered_t, generator)
        else:
            accepted, nxt = greedy_verify(draft_tokens, logits, offered_t)
        acc, nxt_l, drafted_l = accepted.tolist(), nxt.tolist(), draft_tokens.tolist()
        t2 = time.perf_counter()

        acc = [n if a else 0 for n, a in zip(acc, active)]
        n_max = max(acc)
        length = slots.length
        new_mask = [[False] * (n_max + 1) for _ in range(b)]
        kept: list[list[int]] = [[] for _ in range(b)]
        was_active = list(active)
        for r in range(b):
            if not active[r]:
                continue
            n = acc[r]
            emitted = drafted_l[r][:n] + [nxt_l[r]]
            cut = _stop_index(emitted, slots.host[r], eos, criteria, device) if (eos or criteria) else None
            if cut is not None:
                emitted = emitted[: cut + 1]
                active[r] = False
            # accepted drafts sit in slots [0, n) of this step, the target's token in slot n_max
            for j in range(min(len(emitted), n)):
                new_mask[r][j] = True
            if len(emitted) == n + 1:
                new_mask[r][n_max] = True
            kept[r] = emitted
            emitted_rows[r].extend(emitted)
            if len(emitted_rows[r]) >= max_new_tokens:
                active[r] = False
            if streamer is not None:
                streamer.put(torch.tensor(emitted))
        new_ids = torch.cat([draft_tokens[:, :n_max], nxt[:, None]], dim=1)
        slots.append(new_ids, torch.tensor(new_mask, dtype=torch.bool, device=device), kept)
        crop_cache(t_cache, length + n_max)
        drafter.rollback(length + n_max)

        live = [r for r in range(b) if was_active[r]]
        stats.target_passes += 1
        stats.row_passes += len(live)
        stats.drafted += sum(offered[r] for r in live)
        stats.accepted += sum(acc[r] for r in live)
        stats.draft_lengths.append(k)
        stats.accepted_per_step.append(sum(acc[r] for r in live) / len(live))
        stats.draft_seconds += t1 - t0
        stats.target_seconds += t2 - t1
        control.update([acc[r] for r in live], [offered[r] for r in live], t1 - t0, t2 - t1, k)

    if streamer is not None:
        streamer.end()
    width = max(len(e) for e in emitted_rows)
    out = [e + [pad] * (width - len(e)) for e in emitted_rows]
    stats.new_tokens = sum(len(e) for e in emitted_rows)
    stats.seconds = time.perf_counter() - start
    return torch.cat([input_ids, torch.tensor(out, dtype=input_ids.dtype, device=device).view(b, width)], dim=1), stats


def expected_tokens_per_pass(acceptance: float, k: int) -> float:
    """Expected emitted tokens per target pass for i.i.d. per-token acceptance ``acceptance``."""
    if acceptance >= 1:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


__all__ = ["DraftLength", "SpeculativeStats", "expected_tokens_per_pass", "speculative_generate"]
