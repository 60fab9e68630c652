"""Block-wise exact attention (online softmax) against a dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from hf_efficiency.attention.blockwise import blockwise_attention


def dense(query, key, value, mask=None, causal=True, scale=None, softcap=None, window=None):
    b, h, q, d = query.shape
    groups = h // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).double()
    v = value.repeat_interleave(groups, dim=1).double()
    s = query.double() @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    kv = key.shape[2]
    qi = torch.arange(kv - q, kv)[:, None]
    kj = torch.arange(kv)[None, :]
    allowed = torch.ones(q, kv, dtype=torch.bool)
    if causal:
        allowed &= kj <= qi
    if window is not None:
        allowed &= qi - kj < window
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).float()


@pytest.mark.parametrize("q,kv,h,h_kv", [(37, 37, 4, 4), (64, 64, 6, 2), (1, 50, 4, 2), (5, 43, 9, 3)])
@pytest.mark.parametrize("blocks", [(8, 16), (256, 512), (3, 7)])
def test_matches_dense_attention_causal_and_gqa(q, kv, h, h_kv, blocks):
    g = torch.Generator().manual_seed(q * 100 + kv)
    query, key, value = (torch.randn(2, n, s, 16, generator=g) for n, s in ((h, q), (h_kv, kv), (h_kv, kv)))
    out = blockwise_attention(query, key, value, q_block=blocks[0], k_block=blocks[1])
    assert out.shape == (2, h, q, 16)
    torch.testing.assert_close(out, dense(query, key, value), atol=1e-5, rtol=1e-5)


def test_padding_mask_sliding_window_softcap_and_fully_masked_rows():
    g = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(2, 4, 20, 8, generator=g),
        torch.randn(2, 2, 20, 8, generator=g),
        torch.randn(2, 2, 20, 8, generator=g),
    )
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, :6] = False  # left padding of row 1
    mask = pad[:, None, None, :].expand(2, 1, 20, 20)
    for kwargs in ({}, {"window": 5}, {"softcap": 2.0}, {"window": 3, "softcap": 1.5}):
        ref = dense(query, key, value, mask=mask, **kwargs)
        window, softcap = kwargs.get("window"), kwargs.get("softcap")
        out = blockwise_attention(
            query, key, value, mask=mask, sliding_window=window, softcap=softcap, q_block=4, k_block=6
        )
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out = blockwise_attention(query, key, value, mask=mask, q_block=4, k_block=6)
    assert torch.all(out[1, :, :6] == 0)  # padded queries see no key at all: zeros, not NaN
    assert torch.isfinite(out).all()


def test_non_causal_and_bad_input():
    g = torch.Generator().manual_seed(1)
    query, key, value = (
        torch.randn(1, 2, 9, 4, generator=g),
        torch.randn(1, 2, 9, 4, generator=g),
        torch.randn(1, 2, 9, 4, generator=g),
    )
    torch.testing.assert_close(
        blockwise_attention(query, key, value, causal=False, q_block=2, k_block=4),
        dense(query, key, value, causal=False),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        blockwise_attention(torch.randn(1, 3, 9, 4), key, value)
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        blockwise_attention(query, key, value, q_block=0)
    with pytest.raises(ValueError, match="mask must be boolean"):
        blockwise_attention(query, key, value, mask=torch.zeros(1, 1, 9, 9))
