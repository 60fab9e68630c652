"""Verification rules of speculative decoding: greedy identity and exact sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch

from hf_efficiency.speculative.verify import greedy_verify, sampling_verify

# chi-square critical value for 5 degrees of freedom at alpha = 1e-3
CHI2_5DF_CRITICAL = 20.515


def _onehot_logits(best: list[list[int]], vocab: int = 5) -> torch.Tensor:
    logits = torch.zeros(len(best), len(best[0]), vocab)
    for b, row in enumerate(best):
        for i, t in enumerate(row):
            logits[b, i, t] = 1.0
    return logits


def test_greedy_keeps_longest_agreeing_prefix_plus_target_token():
    draft = torch.tensor([[1, 2, 3], [1, 4, 3], [0, 0, 0]])
    target = _onehot_logits([[1, 2, 3, 4], [1, 2, 3, 4], [2, 0, 0, 1]])
    accepted, nxt = greedy_verify(draft, target)
    assert accepted.tolist() == [3, 1, 0]
    assert nxt.tolist() == [4, 2, 2]  # bonus token, correction, correction


def test_greedy_respects_each_rows_draft_length():
    draft = torch.tensor([[1, 2, 3], [1, 2, 3]])
    target = _onehot_logits([[1, 2, 3, 4], [1, 2, 3, 4]])
    accepted, nxt = greedy_verify(draft, target, draft_lengths=torch.tensor([2, 0]))
    assert accepted.tolist() == [2, 0]
    assert nxt.tolist() == [3, 1]


@pytest.mark.parametrize("fn", ["greedy", "sampling"])
def test_bad_shapes_raise(fn):
    draft = torch.zeros(2, 3, dtype=torch.long)
    bad_target = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"target scores must be \[batch, k \+ 1, vocab\] = \[2, 4, V\]"):
        if fn == "greedy":
            greedy_verify(draft, bad_target)
        else:
            sampling_verify(draft, torch.full((2, 3, 5), 0.2), bad_target)
    with pytest.raises(ValueError, match=r"draft_lengths must be \[batch\] integers in \[0, 3\]"):
        greedy_verify(draft, torch.zeros(2, 4, 5), draft_lengths=torch.tensor([1, 4]))


def _dists(seed: int, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(k + 1, vocab, generator=g).pow(3)
    q = torch.rand(k, vocab, generator=g).pow(3)
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def _emitted(draft, accepted, nxt, position):
    """Token at `position` of each row's emitted sequence (draft[:accepted] + [next]); rows too short drop."""
    has = accepted >= position
    tok = torch.where(accepted[has] > position, draft[has, min(position, draft.shape[1] - 1)], nxt[has])
    return tok


def test_sampling_verify_emits_the_target_distribution():
    """Context-free target/draft distributions per position (V=6, k=3), 40,000 rows at once.

    Power: the same test applied to the draft's own distribution (what "always accept" would emit) gives a
    chi-square in the thousands, against the 20.5 critical value at alpha = 1e-3.
    """
    vocab, k, n = 6, 3, 40_000
    p, q = _dists(0, k, vocab)
    g = torch.Generator().manual_seed(1)
    draft = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], dim=1)
    draft_probs = q[None].expand(n, k, vocab)
    target_probs = p[None].expand(n, k + 1, vocab)
    accepted, nxt = sampling_verify(draft, draft_probs, target_probs, generator=g)
    assert 0 < accepted.float().mean() < k
    for pos in range(k + 1):
        tokens = _emitted(draft, accepted, nxt, pos)
        assert len(tokens) > 1000  # later positions exist only where earlier drafts were accepted
        assert _chi2(tokens, p[pos]) < CHI2_5DF_CRITICAL, pos
    # negative control: the draft's own first token is far from the target's distribution
    assert _chi2(draft[:, 0], p[0]) > 50 * CHI2_5DF_CRITICAL


def test_sampling_verify_accepts_everything_when_draft_equals_target():
    vocab, k, n = 6, 4, 500
    p, _ = _dists(3, k, vocab)
    g = torch.Generator().manual_seed(2)
    draft = torch.stack([torch.multinomial(p[i], n, replacement=True, generator=g) for i in range(k)], dim=1)
    accepted, nxt = sampling_verify(draft, p[None, :k].expand(n, k, vocab), p[None].expand(n, k + 1, vocab),
                                    generator=g)
    assert accepted.tolist() == [k] * n
    assert _chi2(nxt, p[k]) < CHI2_5DF_CRITICAL


def test_sampling_verify_short_rows_take_a_target_sample():
    vocab, k, n = 6, 3, 20_000
    p, q = _dists(5, k, vocab)
    g = torch.Generator().manual_seed(4)
    draft = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], dim=1)
    lengths = torch.zeros(n, dtype=torch.long)
    accepted, nxt = sampling_verify(draft, q[None].expand(n, k, vocab), p[None].expand(n, k + 1, vocab),
                                    draft_lengths=lengths, generator=g)
    assert accepted.tolist() == [0] * n
    assert _chi2(nxt, p[0]) < CHI2_5DF_CRITICAL
