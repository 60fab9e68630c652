"""``attn_implementation="hf_efficiency_blockwise"`` inside real transformers models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

import hf_efficiency  # noqa: F401  (registration)

GQA = dict(seed=1, num_hidden_layers=2, initializer_range=0.1, num_attention_heads=4, num_key_value_heads=2)


def _padded_batch():
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


@pytest.mark.parametrize("path", ["auto", "blockwise"])
def test_logits_match_eager_on_padded_gqa_batch_and_cached_decoding(monkeypatch, path):
    monkeypatch.setenv("HF_EFFICIENCY_ATTENTION_PATH", path)
    eager = make_tiny_llama(**GQA, attn_implementation="eager")
    ours = make_tiny_llama(**GQA, attn_implementation="hf_efficiency_blockwise")
    ids, mask = _padded_batch()
    with torch.no_grad():
        ref, out = eager(ids, attention_mask=mask), ours(ids, attention_mask=mask)
        keep = mask.bool()
        assert (ref.logits - out.logits)[keep].abs().max() < 1e-5
        # one cached decoding step after the prompt
        nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        a = eager(nxt, attention_mask=step_mask, cache=ref.past_key_values).logits
        b = ours(nxt, attention_mask=step_mask, cache=out.past_key_values).logits
        assert (a - b).abs().max() < 1e-5
    sdpa = make_tiny_llama(**GQA)
    gen = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(ids, **gen), sdpa.generate(ids, **gen))


def test_softcap_and_sliding_window_take_the_blockwise_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=None,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    eager = Gemma2ForCausalLM(Gemma2Config(**cfg, attn_implementation="eager")).eval()
    ours = Gemma2ForCausalLM(Gemma2Config(**cfg, attn_implementation="hf_efficiency_blockwise")).eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        diff = (eager(ids, attention_mask=mask).logits - ours(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-5


def test_switching_and_errors(monkeypatch):
    model = make_tiny_llama(**GQA)
    model.set_attn_implementation("hf_efficiency_blockwise")
    assert model.config._attn_implementation == "hf_efficiency_blockwise"
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        model(ids, attention_mask=mask, output_attentions=True)
    monkeypatch.setenv("HF_EFFICIENCY_ATTENTION_PATH", "fast")
    with pytest.raises(ValueError, match="HF_EFFICIENCY_ATTENTION_PATH='fast' is not allowed; allowed values: auto"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match='attn_implementation="hf_efficiency_nope"'):
        make_tiny_llama(attn_implementation="hf_efficiency_nope")
