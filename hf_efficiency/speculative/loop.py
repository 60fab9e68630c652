"""The draft-then-verify loop over two causal LMs with KV caches (batch 1 so far; issue 6 in progress).

Invariant between steps: ``seq`` holds every token so far; both caches hold the keys/values of
``seq[:-1]`` at most, so each step feeds only the tokens a model has not seen. After verification both
caches are cropped back to ``len(seq) - 1`` positions, which drops the rejected draft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from .verify import greedy_verify, sampling_verify


@dataclass
class SpeculativeStats:
    """Counters of one generation: drafted/accepted tokens and target forward passes."""

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    new_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def target_passes_per_token(self) -> float:
        return self.target_passes / self.new_tokens if self.new_tokens else 0.0


def _feed(model: nn.Module, tokens: Tensor, cache: DynamicCache) -> Tensor:
    """Run ``tokens`` [1, n] after what ``cache`` holds; the logits [1, n, V]."""
    past = cache.get_seq_length()
    positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
    return model(input_ids=tokens, cache=cache, use_cache=True, position_ids=positions).logits


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond ``length`` (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: Tensor, *, max_new_tokens: int,
                         num_draft_tokens: int = 4, do_sample: bool = False,
                         eos_token_id: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[Tensor, SpeculativeStats]:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [1, T] with ``draft`` proposing
    ``num_draft_tokens`` tokens per target pass. Greedy output equals the target's own greedy output;
    sampled output follows the target's distribution (temperature 1, no warping yet)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate takes one row [1, T] so far, got {tuple(input_ids.shape)}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seq = input_ids
    prompt_len = input_ids.shape[1]
    t_cache, d_cache = DynamicCache(), DynamicCache()
    stats = SpeculativeStats()
    while seq.shape[1] - prompt_len < max_new_tokens:
        k = min(num_draft_tokens, max_new_tokens - (seq.shape[1] - prompt_len) - 1)
        drafted, q_rows = [], []
        if k > 0:
            logits = _feed(draft, seq[:, d_cache.get_seq_length():], d_cache)[:, -1]
            for i in range(k):
                if do_sample:
                    q = torch.softmax(logits.float(), -1)
                    tok = torch.multinomial(q, 1, generator=generator)
                    q_rows.append(q)
                else:
                    tok = logits.argmax(-1, keepdim=True)
                drafted.append(tok)
                if i + 1 < k:
                    logits = _feed(draft, tok, d_cache)[:, -1]
        draft_tokens = torch.cat(drafted, dim=1) if drafted else seq.new_zeros(1, 0)
        # target: the unseen tail of seq plus the draft; the last k + 1 positions are the ones to verify
        t_logits = _feed(target, torch.cat([seq[:, t_cache.get_seq_length():], draft_tokens], dim=1), t_cache)
        t_logits = t_logits[:, -(k + 1):]
        stats.target_passes += 1
        if do_sample:
            q_probs = torch.stack(q_rows, dim=1) if q_rows else t_logits.new_zeros(1, 0, t_logits.shape[-1])
            accepted, nxt = sampling_verify(draft_tokens, q_probs, torch.softmax(t_logits.float(), -1),
                                            generator=generator)
        else:
            accepted, nxt = greedy_verify(draft_tokens, t_logits)
        n = int(accepted[0])
        stats.drafted += k
        stats.accepted += n
        stats.accepted_per_step.append(n)
        new = torch.cat([draft_tokens[:, :n], nxt[:, None]], dim=1)
        if eos_token_id is not None and bool((new == eos_token_id).any()):
            new = new[:, : int((new[0] == eos_token_id).nonzero()[0]) + 1]
            seq = torch.cat([seq, new], dim=1)
            break
        seq = torch.cat([seq, new], dim=1)
        _crop_to(t_cache, seq.shape[1] - 1)
        _crop_to(d_cache, seq.shape[1] - 1)
    stats.new_tokens = seq.shape[1] - prompt_len
    return seq, stats
