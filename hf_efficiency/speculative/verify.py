"""Verification of drafted tokens: pure tensor functions, batched, each row on its own.

A draft proposes ``k`` tokens per row; the target scores the prompt plus those tokens in one forward
pass, giving ``k + 1`` next-token distributions (one after each drafted position, plus a bonus one).
Each row keeps the longest accepted prefix of its draft plus one token from the target, so every
verification step emits between 1 and ``k + 1`` tokens per row.

- ``greedy_verify``: accept while the draft equals the target's argmax. The output is token for token
  the target's own greedy output.
- ``sampling_verify``: the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023). Accept
  draft token ``x`` with probability ``min(1, p(x) / q(x))``; at the first rejection, sample from the
  normalized residual ``max(0, p - q)``; if everything is accepted, sample the bonus token from the
  target. The emitted tokens are distributed exactly as sampling from the target alone.

Rows may carry fewer than ``k`` drafted tokens (``draft_lengths``): positions past a row's length
count as rejected, with nothing to resample against, so the row takes a plain target sample there.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(draft_tokens: Tensor, target: Tensor, draft_lengths: Tensor | None) -> Tensor:
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be [batch, k], got shape {tuple(draft_tokens.shape)}")
    b, k = draft_tokens.shape
    if target.dim() != 3 or target.shape[0] != b or target.shape[1] != k + 1:
        raise ValueError(f"target scores must be [batch, k + 1, vocab] = [{b}, {k + 1}, V], got {tuple(target.shape)}")
    if draft_lengths is None:
        return torch.full((b,), k, dtype=torch.long, device=draft_tokens.device)
    draft_lengths = draft_lengths.to(device=draft_tokens.device, dtype=torch.long)
    if draft_lengths.shape != (b,) or bool((draft_lengths < 0).any()) or bool((draft_lengths > k).any()):
        raise ValueError(f"draft_lengths must be [batch] integers in [0, {k}], got {draft_lengths.tolist()}")
    return draft_lengths


def _leading_true(ok: Tensor) -> Tensor:
    """Per row, how many leading entries of a ``[B, k]`` bool tensor are True."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def _within_length(draft_lengths: Tensor, k: int) -> Tensor:
    return torch.arange(k, device=draft_lengths.device)[None, :] < draft_lengths[:, None]


def greedy_verify(
    draft_tokens: Tensor, target_logits: Tensor, draft_lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(accepted [B], next_token [B])`` for greedy decoding.

    ``target_logits`` is ``[B, k + 1, V]``: position ``i`` scores the token after the prompt and the
    first ``i`` drafted tokens. Row ``b`` keeps ``draft_tokens[b, :accepted[b]]`` followed by
    ``next_token[b]``, the target's argmax after them (a correction, or the bonus token).
    """
    lengths = _check(draft_tokens, target_logits, draft_lengths)
    k = draft_tokens.shape[1]
    best = target_logits.argmax(dim=-1)
    ok = (draft_tokens == best[:, :k]) & _within_length(lengths, k)
    accepted = _leading_true(ok)
    next_token = best.gather(1, accepted[:, None]).squeeze(1)
    return accepted, next_token


def sampling_verify(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    draft_lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(accepted [B], next_token [B])`` for sampling, by the speculative-sampling rule.

    ``draft_probs`` is ``[B, k, V]``: the distribution each drafted token was sampled from, after the
    same warping (temperature, top-k/p) the target uses. ``target_probs`` is ``[B, k + 1, V]``, also
    warped. Both must be probabilities (rows summing to 1).
    """
    lengths = _check(draft_tokens, target_probs, draft_lengths)
    b, k = draft_tokens.shape
    if draft_probs.shape[:2] != (b, k) or draft_probs.shape[-1] != target_probs.shape[-1]:
        raise ValueError(
            f"draft_probs must be [batch, k, vocab] = [{b}, {k}, {target_probs.shape[-1]}], "
            f"got {tuple(draft_probs.shape)}"
        )
    p = target_probs.float()
    q = draft_probs.float()
    idx = draft_tokens[..., None]
    p_x = p[:, :k].gather(2, idx).squeeze(2)
    q_x = q.gather(2, idx).squeeze(2)
    u = torch.rand(b, k, generator=generator, device=p.device) if k else p.new_zeros(b, 0)
    # accept iff u < p/q, written without the division (q(x) > 0 for a sampled x)
    ok = (u * q_x < p_x) & _within_length(lengths, k)
    accepted = _leading_true(ok)

    rows = torch.arange(b, device=p.device)
    p_next = p[rows, accepted]
    rejected = accepted < lengths  # a drafted token was refused at position `accepted`
    q_next = torch.zeros_like(p_next)
    if k:
        q_next[rejected] = q[rows[rejected], accepted[rejected]]
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # p == q at a rejected position has zero residual mass (probability-0 event); fall back to p
    dist = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_next)
    next_token = torch.multinomial(dist, 1, generator=generator).squeeze(1)
    return accepted, next_token
