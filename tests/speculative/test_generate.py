"""Speculative decoding through model.generate(): every draft kind, batch > 1, sampling, config, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria

from hf_efficiency import EfficiencyConfig, SpeculativeConfig
from hf_efficiency.quant import QuantLinear
from hf_efficiency.speculative import DraftLength, NgramDrafter, early_exit_model, quantized_copy
from hf_efficiency.speculative.drafts import draft_quantization
from hf_efficiency.speculative.slots import left_pad

DRAFTS = ["separate", "int8", "int4", "hqq-int4-g32", "int2", "bfloat16", "early-exit:2", "ngram"]
N_NEW = 24


@pytest.fixture(scope="module")
def target():
    # initializer_range 0.1: outputs vary enough that every draft kind both accepts and rejects
    return make_tiny_llama(seed=1, num_hidden_layers=4, initializer_range=0.1)


@pytest.fixture(scope="module")
def separate_draft():
    return make_tiny_llama(seed=2, num_hidden_layers=1, initializer_range=0.1)


def _draft(kind, separate_draft):
    return separate_draft if kind == "separate" else kind


def _prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 14, (1,), generator=g))
        ids = torch.randint(0, 256, (length,), generator=g)
        if len(out) % 3 == 0:  # some prompts repeat themselves, so that n-gram lookup finds matches
            ids = ids.repeat(2)
        out.append(ids)
    return out


def _plain(model, ids, mask=None, **kw):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=N_NEW, do_sample=False, **kw
    )


@pytest.mark.parametrize("kind", DRAFTS)
def test_greedy_identity_20_prompts_batch_1_and_4(target, separate_draft, kind):
    prompts = _prompts(20)
    draft = _draft(kind, separate_draft)
    drafted = accepted = 0
    singles = []
    for p in prompts:
        ids = p[None]
        ref = _plain(target, ids)
        singles.append(ref[0, ids.shape[1] :])
        out = target.generate(
            ids, max_new_tokens=N_NEW, do_sample=False, draft_model=draft, return_dict_in_generate=True
        )
        assert torch.equal(out.sequences, ref), f"prompt {p.tolist()}"
        drafted += out.speculative_stats.drafted
        accepted += out.speculative_stats.accepted
    assert 0 < accepted < drafted  # both outcomes exercised
    for start in range(0, 20, 4):
        ids, mask = left_pad(prompts[start : start + 4], 256)
        out = target.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, draft_model=draft)
        assert torch.equal(out, _plain(target, ids, mask))  # transformers' own batched greedy
        for r in range(4):  # and each row equals its own single-row result
            assert torch.equal(out[r, ids.shape[1] :], singles[start + r])


def test_rows_stopping_at_different_times_are_padded_like_transformers(target, separate_draft):
    ids, mask = left_pad(_prompts(4, seed=3), 256)
    ref = _plain(target, ids, mask)
    eos = int(ref[1, ids.shape[1] + 5])  # a token some rows produce early
    ref = _plain(target, ids, mask, eos_token_id=eos, pad_token_id=7)
    for draft in (separate_draft, "ngram", "early-exit:3"):
        out = target.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=N_NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=7,
            draft_model=draft,
        )
        assert torch.equal(out, ref)
    assert (ref[:, ids.shape[1] :] == 7).any()  # some row did stop early


class _StopAfter(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_processors_and_stopping_criteria_match_plain_greedy(target, separate_draft):
    ids, mask = left_pad(_prompts(4, seed=5), 256)
    rp = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    ref = _plain(target, ids, mask, logits_processor=rp)
    out = target.generate(
        ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, logits_processor=rp, draft_model=separate_draft
    )
    assert torch.equal(out, ref)
    stop = int(_plain(target, ids[:1], mask[:1])[0, ids.shape[1] + 4])
    ref = _plain(target, ids[:1], mask[:1], stopping_criteria=[_StopAfter(stop)])
    out = target.generate(
        ids[:1],
        attention_mask=mask[:1],
        max_new_tokens=N_NEW,
        do_sample=False,
        stopping_criteria=[_StopAfter(stop)],
        draft_model="int4",
    )
    assert torch.equal(out, ref) and int(out[0, -1]) == stop


def test_sampled_tokens_follow_the_target_distribution():
    """20,000 rows of one prompt through generate(do_sample=True, temperature, top_k) with a weak draft
    drafting 2 tokens per pass (so the first two tokens come from accepted drafts, corrections and bonus
    tokens alike).

    The first two new tokens (a joint distribution over at most 8 x 8 cells after top-k) are compared
    with the target's exact distribution computed by enumeration. Chi-square critical value at
    alpha = 1e-3 for the cells' degrees of freedom; power: the draft's own joint distribution, tested
    the same way against the target's, scores far above it (negative control below).
    """
    torch.manual_seed(0)
    target = make_tiny_llama(
        seed=3, num_hidden_layers=2, vocab_size=16, eos_token_id=None, pad_token_id=0, initializer_range=0.3
    )
    draft = early_exit_model(target, 1)  # accepts about a third of its tokens here
    prompt = torch.tensor([[3, 7, 1]])
    gen = dict(do_sample=True, temperature=0.8, top_k=8, max_new_tokens=3)
    n = 20_000
    torch.manual_seed(1)
    out = target.generate(
        prompt.repeat(n, 1),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        draft_model=draft,
        speculative=SpeculativeConfig(num_draft_tokens=2, schedule="constant"),
        return_dict_in_generate=True,
        **gen,
    )
    stats, out = out.speculative_stats, out.sequences
    assert 0.1 < stats.acceptance_rate < 0.9
    assert stats.draft_lengths[0] == 2
    pairs = out[:, 3] * 16 + out[:, 4]

    def joint(model):
        procs = model._get_logits_processor(model.generation_config.__class__(**gen), 3, None, None, None)
        with torch.no_grad():
            first = torch.softmax(procs(prompt, model(prompt).logits[:, -1]), -1)[0]
            grid = torch.zeros(16, 16)
            for t in range(16):
                if first[t] > 0:
                    ids = torch.cat([prompt, torch.tensor([[t]])], 1)
                    grid[t] = first[t] * torch.softmax(procs(ids, model(ids).logits[:, -1]), -1)[0]
        return grid.flatten()

    def chi2(p):
        counts = torch.bincount(pairs, minlength=256).double()
        keep = p > 0
        assert counts[~keep].sum() == 0 or p is not p_target
        expected = p[keep].double() * n
        return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1

    p_target = joint(target)
    stat, dof = chi2(p_target)
    # the chi-square quantile at 0.999 (Wilson-Hilferty; z = 3.0902 is the normal quantile at 0.999)
    critical = dof * (1 - 2 / (9 * dof) + 3.0902 * (2 / (9 * dof)) ** 0.5) ** 3
    assert stat < critical, (stat, dof, critical)
    q_draft = joint(draft)  # negative control: what accepting every draft token would emit
    q_draft = torch.where(p_target > 0, q_draft, torch.zeros_like(q_draft))
    q_draft = q_draft / q_draft.sum()
    assert chi2(q_draft)[0] > 20 * critical


def test_saved_speculative_config_drives_plain_generate(tmp_path, target):
    target.save_pretrained(tmp_path / "fp")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp",
        efficiency_config=EfficiencyConfig(speculative={"draft": "early-exit:2", "num_draft_tokens": 3}),
    )
    model.save_pretrained(tmp_path / "spec")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "spec")
    assert loaded.config.quantization_config.speculative == SpeculativeConfig(draft="early-exit:2", num_draft_tokens=3)
    ids = _prompts(1)[0][None]
    out = loaded.generate(ids, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _plain(target, ids))
    assert out.speculative_stats.target_passes > 0
    assert out.speculative_stats.draft_lengths[0] == 3
    plain = loaded.generate(ids, max_new_tokens=N_NEW, do_sample=False, speculative=False, return_dict_in_generate=True)
    assert torch.equal(plain.sequences, out.sequences) and not hasattr(plain, "speculative_stats")
    beams = loaded.generate(  # the saved spec steps aside
        ids, max_new_tokens=4, num_beams=2, do_sample=False, return_dict_in_generate=True
    )
    assert beams.sequences.shape == (1, ids.shape[1] + 4) and not hasattr(beams, "speculative_stats")
    with pytest.raises(ValueError, match="does not do beam search"):  # asked for explicitly: refused
        loaded.generate(ids, max_new_tokens=4, num_beams=2, speculative=True)


def test_streamer_receives_prompt_then_every_token(target):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    ids = _prompts(1)[0][None]
    out = target.generate(ids, max_new_tokens=N_NEW, do_sample=False, draft_model="ngram", streamer=rec)
    assert rec.ended and rec.chunks[0] == ids[0].tolist()
    assert [t for chunk in rec.chunks[1:] for t in chunk] == out[0, ids.shape[1] :].tolist()


def test_bad_input_raises_clear_errors(target, separate_draft):
    ids, _ = left_pad(_prompts(3), 256)
    other_vocab = make_tiny_llama(seed=5, vocab_size=300)
    with pytest.raises(ValueError, match="draft's vocabulary has 300 ids and the target's 257"):
        target.generate(ids[:1], max_new_tokens=4, draft_model=other_vocab)
    with pytest.raises(ValueError, match="contains the pad token .* no attention_mask"):
        target.generate(ids, max_new_tokens=4, draft_model="ngram")
    with pytest.raises(ValueError, match="num_draft_tokens=0 is not allowed"):
        target.generate(ids[:1], max_new_tokens=4, speculative=SpeculativeConfig(num_draft_tokens=0))
    with pytest.raises(ValueError, match="does not do beam search"):
        target.generate(ids[:1], max_new_tokens=4, num_beams=2, draft_model="ngram")
    with pytest.raises(ValueError, match="output_scores=True is not supported"):
        target.generate(ids[:1], max_new_tokens=4, output_scores=True, draft_model="ngram")
    with pytest.raises(ValueError, match="either assistant_model="):
        target.generate(ids[:1], max_new_tokens=4, assistant_model=separate_draft, draft_model="ngram")
    with pytest.raises(ValueError, match="early-exit:4 needs 1 <= K < 4"):
        target.generate(ids[:1], max_new_tokens=4, draft_model="early-exit:4")
    with pytest.raises(ValueError, match="draft='early-exit:x' is not allowed"):
        target.generate(ids[:1], max_new_tokens=4, speculative={"draft": "early-exit:x"})


def test_different_tokenizers_are_refused(byte_tokenizer, target, separate_draft):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(65 + i): i for i in range(26)}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="A")))
    with pytest.raises(
        ValueError,
        match="target and draft tokenizers differ: 26 shared tokens have different ids.*uses the target's tokenizer",
    ):
        target.generate(
            torch.tensor([[1, 2, 3]]),
            max_new_tokens=4,
            draft_model=separate_draft,
            tokenizer=byte_tokenizer,
            draft_tokenizer=other,
        )
    out = target.generate(
        torch.tensor([[1, 2, 3]]),
        max_new_tokens=4,
        draft_model=separate_draft,
        tokenizer=byte_tokenizer,
        draft_tokenizer=byte_tokenizer,
    )
    assert out.shape == (1, 7)


def test_adaptive_draft_length_follows_acceptance_and_cost():
    spec = SpeculativeConfig(num_draft_tokens=4, max_draft_tokens=8)
    free = DraftLength(spec)
    free.update([4], [4], draft_seconds=0.0, target_seconds=1.0, drafted=4)
    assert free.k == 8  # all accepted and drafting is free: draft the most
    costly = DraftLength(spec)
    for _ in range(5):  # half the drafted tokens rejected, a drafted token costs as much as a target pass
        costly.update([1], [2], draft_seconds=2.0, target_seconds=1.0, drafted=2)
    assert costly.k == 1
    middle = DraftLength(spec)
    for _ in range(5):  # a = 0.8, r = 0.1: (1 - a^(k+1)) / (1 - a) / (1 + 0.1 k) peaks at k = 6 (2.47)
        middle.update([4], [5], draft_seconds=0.5, target_seconds=1.0, drafted=5)
    assert middle.k == 6
    const = DraftLength(SpeculativeConfig(num_draft_tokens=3, schedule="constant"))
    const.update([0], [3], 9.0, 1.0, 3)
    assert const.k == 3


def test_ngram_lookup_prefers_the_latest_full_match():
    d = NgramDrafter(vocab_size=10, max_ngram=2)
    row = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2]
    assert d.continuation(row, 3) == [5, 6, 1]  # the later "1 2" wins
    assert d.continuation([7, 8, 9], 3) == []
    assert d.continuation([4, 9, 4], 2) == [9, 4]  # falls back to a 1-gram
    assert d.continuation([5, 5, 5], 4) == [5]  # the match must have a token after it
    assert d.continuation([7, 1, 2, 3, 1, 2], 2) == [3, 1]
    loop = [9] * 10
    assert d.continuation(loop, 4) == [9, 9, 9, 9]  # inside a loop: not the overlapping last match


def test_built_drafts_share_the_targets_tensors(target):
    ee = early_exit_model(target, 2)
    assert ee.model.embed_tokens.weight is target.model.embed_tokens.weight
    assert len(ee.model.layers) == 2 and len(target.model.layers) == 4 and target.config.num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = make_tiny_llama(seed=1, num_hidden_layers=2, initializer_range=0.1)
    ref.load_state_dict({k: v for k, v in target.state_dict().items() if "layers.2" not in k and "layers.3" not in k})
    with torch.no_grad():
        assert torch.allclose(ee(ids).logits, ref(ids).logits, atol=1e-6)
    before = target.model.layers[0].mlp.up_proj.weight.clone()
    q = quantized_copy(target, draft_quantization("int4"))
    assert isinstance(q.model.layers[0].mlp.up_proj, QuantLinear) and q.model.layers[0].mlp.up_proj.bits == 4
    assert isinstance(target.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(target.model.layers[0].mlp.up_proj.weight, before)
    assert q.model.embed_tokens.weight is target.model.embed_tokens.weight
    assert draft_quantization("int8").group_size is None and draft_quantization("int8").symmetric
    assert draft_quantization("int4").group_size == 32 and draft_quantization("int4-g128").group_size == 128
    assert draft_quantization("hqq-int3-g64").method == "hqq" and draft_quantization("hqq-int3-g64").bits == 3
