"""Verification rules of speculative decoding: greedy identity and exact sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch

from hf_efficiency.config import SpeculativeSpec
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
    accepted, nxt = sampling_verify(
        draft, p[None, :k].expand(n, k, vocab), p[None].expand(n, k + 1, vocab), generator=g
    )
    assert accepted.tolist() == [k] * n
    assert _chi2(nxt, p[k]) < CHI2_5DF_CRITICAL


def test_sampling_verify_short_rows_take_a_target_sample():
    vocab, k, n = 6, 3, 20_000
    p, q = _dists(5, k, vocab)
    g = torch.Generator().manual_seed(4)
    draft = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], dim=1)
    lengths = torch.zeros(n, dtype=torch.long)
    accepted, nxt = sampling_verify(
        draft, q[None].expand(n, k, vocab), p[None].expand(n, k + 1, vocab), draft_lengths=lengths, generator=g
    )
    assert accepted.tolist() == [0] * n
    assert _chi2(nxt, p[0]) < CHI2_5DF_CRITICAL


# ---------------------------------------------------------------- the draft-then-verify loop


def _greedy_reference(model, ids, n, eos=None):
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_target_greedy(k):
    from conftest import make_tiny_llama

    from hf_efficiency.speculative.loop import speculative_generate

    target = make_tiny_llama(seed=1, num_hidden_layers=4)
    draft = make_tiny_llama(seed=2, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, 256, (1, int(torch.randint(3, 12, (1,), generator=g))), generator=g)
        out, stats = speculative_generate(target, draft, ids, max_new_tokens=17, num_draft_tokens=k)
        assert torch.equal(out, _greedy_reference(target, ids, 17))
        assert stats.new_tokens == 17 and stats.target_passes <= 17


def test_self_draft_accepts_everything_and_saves_target_passes():
    from conftest import make_tiny_llama

    from hf_efficiency.speculative.loop import speculative_generate

    target = make_tiny_llama(seed=1, num_hidden_layers=2)
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    out, stats = speculative_generate(
        target, target, ids, max_new_tokens=20, num_draft_tokens=4, spec=SpeculativeSpec(schedule="constant")
    )
    assert torch.equal(out, _greedy_reference(target, ids, 20))
    assert stats.acceptance_rate == 1.0
    assert stats.target_passes == 4 and stats.target_passes_per_token == pytest.approx(0.2)


def test_speculative_stops_at_eos_and_rejects_bad_input():
    from conftest import make_tiny_llama

    from hf_efficiency.speculative.loop import speculative_generate

    target = make_tiny_llama(seed=1, num_hidden_layers=2)
    ids = torch.tensor([[72, 101, 108]])
    ref = _greedy_reference(target, ids, 12)
    eos = int(ref[0, ids.shape[1] + 3])  # the 4th generated token acts as eos
    out, _ = speculative_generate(target, target, ids, max_new_tokens=12, num_draft_tokens=3, eos_token_id=eos)
    assert torch.equal(out, _greedy_reference(target, ids, 12, eos=eos)[:, : out.shape[1]])
    assert int(out[0, -1]) == eos and out.shape[1] <= ids.shape[1] + 4
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 1, got 0"):
        speculative_generate(target, target, ids, max_new_tokens=4, num_draft_tokens=0)
    with pytest.raises(ValueError, match="right-padded .* padding_side='left'"):
        speculative_generate(target, target, ids.repeat(2, 1), torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        speculative_generate(target, target, ids, max_new_tokens=0)


def test_speculative_sampling_loop_runs_seeded_and_reproducible():
    from conftest import make_tiny_llama

    from hf_efficiency.speculative.loop import speculative_generate

    target = make_tiny_llama(seed=1, num_hidden_layers=3)
    draft = make_tiny_llama(seed=2, num_hidden_layers=1)
    ids = torch.tensor([[72, 101, 108]])
    runs = [
        speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=15,
            num_draft_tokens=3,
            do_sample=True,
            spec=SpeculativeSpec(schedule="constant"),  # draft length free of timings
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][0].shape[1] == ids.shape[1] + 15
    assert runs[0][1].drafted >= runs[0][1].accepted
