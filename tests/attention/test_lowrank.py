"""Training-free low-rank attention: exact limits, causality, padding, inside a model, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from hf_efficiency.attention.blockwise import blockwise_attention
from hf_efficiency.attention.lowrank import lowrank_attention


def _qkv(q=60, kv=60, h=4, h_kv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, h, q, 8, generator=g),
        torch.randn(2, h_kv, kv, 8, generator=g),
        torch.randn(2, h_kv, kv, 8, generator=g),
    )


@pytest.mark.parametrize("q", [60, 7, 1])
def test_exact_when_every_key_is_its_own_landmark_or_inside_the_window(q):
    query, key, value = _qkv(q=q)
    exact = blockwise_attention(query, key, value)
    torch.testing.assert_close(
        lowrank_attention(query, key, value, landmarks=60, window=0), exact, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        lowrank_attention(query, key, value, landmarks=4, window=60), exact, atol=1e-5, rtol=1e-5
    )


def test_causal_padding_and_the_exact_limit_of_the_rank():
    query, key, value = _qkv()
    out = lowrank_attention(query, key, value, landmarks=6, window=10)
    later = key.clone()
    later[:, :, 40:] += 5.0  # the future of position 39 must not matter to it
    assert torch.equal(lowrank_attention(query, later, value, landmarks=6, window=10)[:, :, :40], out[:, :, :40])
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :9] = False
    mask = valid[:, None, None, :].expand(2, 1, 60, 60)
    torch.testing.assert_close(
        lowrank_attention(query, key, value, landmarks=60, window=0, key_valid=valid),
        blockwise_attention(query, key, value, mask=mask),
        atol=1e-5,
        rtol=1e-5,
    )
    exact = blockwise_attention(query, key, value)
    errors = [
        float((lowrank_attention(query, key, value, landmarks=r, window=8) - exact).norm() / exact.norm())
        for r in (4, 15, 30, 60)
    ]
    # random keys have no structure to pool, so the error is not monotone in the rank here; what must hold is
    # that fewer landmarks than keys approximate and one landmark per key is exact
    assert min(errors[:-1]) > 1e-3 and errors[-1] < 1e-6


def test_inside_a_model_with_saved_settings(tmp_path):
    from transformers import AutoModelForCausalLM

    make_tiny_llama(seed=1, num_hidden_layers=2, initializer_range=0.1).save_pretrained(tmp_path / "fp")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", attn_implementation="eager")
    exactish = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp",
        efficiency_config={
            "attention": {"implementation": "hf_efficiency_lowrank", "lowrank_landmarks": 64, "lowrank_window": 0}
        },
    )
    coarse = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp",
        efficiency_config={
            "attention": {
                "implementation": "hf_efficiency_lowrank",
                "lowrank_landmarks": 4,
                "lowrank_window": 8,
                "lowrank_sinks": 1,
            }
        },
    )
    assert exactish.config._attn_implementation == "hf_efficiency_lowrank"
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits
        keep = mask.bool()
        assert (exactish(ids, attention_mask=mask).logits - ref)[keep].abs().max() < 1e-5
        assert (coarse(ids, attention_mask=mask).logits - ref)[keep].abs().max() > 1e-3  # an approximation
    out = exactish.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, eager.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))


def test_sliding_window_layers_are_exact_and_full_layers_are_approximated(tmp_path):
    """Gemma 3 mixes sliding-window and full layers: the sliding layers (already local) are computed exactly,
    padding included, and with a window covering the sequence the whole model equals eager (it used to read
    the sliding mask's last row as "padding" and garble every earlier query)."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", attn_implementation="eager").eval()
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    keep = mask.bool()
    diffs = {}
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits
        for landmarks, window in ((4, 64), (4, 8)):
            attention = {"implementation": "hf_efficiency_lowrank", "lowrank_landmarks": landmarks}
            model = AutoModelForCausalLM.from_pretrained(
                tmp_path / "fp", efficiency_config={"attention": {**attention, "lowrank_window": window}}
            ).eval()
            diffs[window] = float((model(ids, attention_mask=mask).logits - ref)[keep].abs().max())
    assert diffs[64] < 1e-5, diffs
    assert diffs[8] > 1e-3, diffs  # the full layer is approximated


def test_bad_arguments():
    from hf_efficiency import EfficiencyConfig

    query, key, value = _qkv()
    with pytest.raises(ValueError, match="landmarks=0 is not allowed; allowed values: integers >= 1"):
        lowrank_attention(query, key, value, landmarks=0, window=4)
    with pytest.raises(ValueError, match="window=-1 is not allowed"):
        lowrank_attention(query, key, value, landmarks=4, window=-1)
    with pytest.raises(ValueError, match="attention.lowrank_landmarks=0 is not allowed"):
        EfficiencyConfig(attention={"lowrank_landmarks": 0})
