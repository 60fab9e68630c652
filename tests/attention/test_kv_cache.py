"""Quantized KV cache: codes, packing, the Cache subclass in generate(), cropping, bytes, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers.cache_utils import DynamicCache

from hf_efficiency.attention.kv_cache import QuantizedKVCache, QuantizedKVLayer, cache_nbytes
from hf_efficiency.attention.kv_quant import dequantize_kv, kv_bytes_per_token, quantize_kv


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [8, 32])
def test_round_trip_error_is_at_most_half_a_step(bits, group):
    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(bits * group)) * 3
    codes, scale, lo = quantize_kv(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 5, 32 * bits // 8)
    assert scale.shape == lo.shape == (2, 3, 5, 32 // group)
    y = dequantize_kv(codes, scale, lo, bits, group, torch.float32)
    step = scale.float().repeat_interleave(group, dim=-1)
    # half a step, plus the float16 rounding of the stored scale and minimum
    assert ((y - x).abs() <= step / 2 + 2e-3 * x.abs().amax()).all()
    # packing is lossless: re-quantizing the dequantized states gives the same codes
    assert torch.equal(quantize_kv(y, bits, group)[0], codes)


def test_generate_with_the_quantized_cache_and_its_size():
    model = make_tiny_llama(seed=1, num_hidden_layers=2, initializer_range=0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    for bits in (8, 4):
        cache = QuantizedKVCache(bits=bits, group_size=16)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache=cache)
        if bits == 8:  # int4 changes some of this sensitive random model's greedy choices
            assert torch.equal(out, ref)
        # 31 cached tokens (12 + 19 fed back), 2 layers x 2 kv heads x head_dim 16
        assert cache.get_seq_length() == 31
        per_token = kv_bytes_per_token(2, 2, 16, bits, 16)
        assert cache.nbytes() == 2 * 31 * per_token and cache.bytes_per_token() == per_token
        assert cache_nbytes(cache) == cache.nbytes()
    dynamic = DynamicCache()
    assert cache_nbytes(dynamic) == 0
    model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache=dynamic)
    assert cache_nbytes(dynamic) == 2 * 31 * 2 * (2 * 2 * 16 * 4)  # rows x tokens x layers x (k, v) heads dim fp32
    assert kv_bytes_per_token(2, 2, 16, None, 16) == 256  # float16: 2 (k, v) x 2 layers x 2 heads x 16 x 2 bytes


def _layers(residual):
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    full, short = QuantizedKVLayer(4, 8, residual), QuantizedKVLayer(4, 8, residual)
    full.update(k[:, :, :6], v[:, :, :6])
    full.update(k[:, :, 6:], v[:, :, 6:])
    full.crop(-3)
    short.update(k[:, :, :6], v[:, :, :6])
    short.update(k[:, :, 6:7], v[:, :, 6:7])
    assert full.get_seq_length() == short.get_seq_length() == 7
    return full.update(k[:, :, 9:], v[:, :, 9:]), short.update(k[:, :, 9:], v[:, :, 9:]), full


def test_crop_equals_a_cache_that_never_saw_the_cropped_tokens():
    a, b, full = _layers(residual=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # every token quantized once, the same way
    full.crop(-100)
    assert full.get_seq_length() == 0


def test_crop_with_a_float_window_keeps_lengths_and_stays_within_quantization_error():
    # with residual_length > 0 a cropped cache may hold quantized tokens that a fresh cache would still
    # keep in float: same tokens, within one quantization step
    a, b, _ = _layers(residual=3)
    assert all(x.shape == y.shape for x, y in zip(a, b))
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) < 0.5


def test_dynamic_cache_crop_reaches_quantized_layers():
    model = make_tiny_llama(seed=1, num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 9))
    cache = QuantizedKVCache(bits=8, group_size=16)
    model(ids, cache=cache)
    cache.crop(-4)  # what speculative decoding does after a rejection
    assert cache.get_seq_length() == 5 and all(layer.get_seq_length() == 5 for layer in cache.layers)
    fresh = DynamicCache()
    with torch.no_grad():
        a = model(ids[:, 5:6], cache=cache, position_ids=torch.tensor([[5]])).logits
        model(ids[:, :5], cache=fresh)
        b = model(ids[:, 5:6], cache=fresh, position_ids=torch.tensor([[5]])).logits
    assert (a - b).abs().max() < 0.05  # only the quantization error of the 5 cached tokens


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"KV cache bits=3 is not supported; allowed values: 8, 4, 2"):
        QuantizedKVCache(bits=3)
    with pytest.raises(ValueError, match="KV cache group_size=0 is not allowed"):
        QuantizedKVCache(group_size=0)
    with pytest.raises(ValueError, match="residual_length=-1 is not allowed"):
        QuantizedKVCache(residual_length=-1)
    model = make_tiny_llama(seed=1)
    with pytest.raises(ValueError, match="group_size=12 must divide the head dimension 16"):
        model(torch.tensor([[1, 2, 3]]), cache=QuantizedKVCache(group_size=12))


def test_saved_attention_section_picks_implementation_and_kv_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_efficiency import EfficiencyConfig

    base = make_tiny_llama(seed=1, num_hidden_layers=2, initializer_range=0.1)
    base.save_pretrained(tmp_path / "fp")
    cfg = EfficiencyConfig(
        attention={"implementation": "hf_efficiency_blockwise", "kv_cache_bits": 8, "kv_group_size": 16}
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp", efficiency_config=cfg).save_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config._attn_implementation == "hf_efficiency_blockwise"
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "a", attn_implementation="eager").config._attn_implementation
        == "eager"
    )  # an explicit request wins
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    seen = []
    original = QuantizedKVLayer.update

    def spy(self, *args, **kwargs):
        seen.append(self.bits)
        return original(self, *args, **kwargs)

    QuantizedKVLayer.update = spy
    try:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        spec = model.generate(ids, max_new_tokens=8, do_sample=False, draft_model="ngram")
    finally:
        QuantizedKVLayer.update = original
    assert seen and set(seen) == {8}  # the saved int8 cache served both generations
    assert torch.equal(out, base.generate(ids, max_new_tokens=8, do_sample=False)) and torch.equal(spec, out)
    with pytest.raises(ValueError, match="attention.kv_cache_bits=3 is not allowed"):
        EfficiencyConfig(attention={"kv_cache_bits": 3})
    with pytest.raises(ValueError, match="attention.implementation='hf_efficiency_flash' is not allowed"):
        EfficiencyConfig(attention={"implementation": "hf_efficiency_flash"})


def test_cache_implementation_name_in_generate():
    model = make_tiny_llama(seed=1, num_hidden_layers=2, initializer_range=0.1)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    seen = []
    original = QuantizedKVLayer.update

    def spy(self, *args, **kwargs):
        seen.append((self.bits, self.group_size))
        return original(self, *args, **kwargs)

    QuantizedKVLayer.update = spy
    try:
        out = model.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            cache_implementation="hf_efficiency_quantized",
            cache_config={"bits": 8, "group_size": 16},
        )
    finally:
        QuantizedKVLayer.update = original
    assert set(seen) == {(8, 16)}
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))
    with pytest.raises(ValueError, match=r"unknown cache_config key\(s\) \['nbits'\]"):
        model.generate(ids, max_new_tokens=2, cache_implementation="hf_efficiency_quantized", cache_config={"nbits": 4})
    with pytest.raises(ValueError, match="either cache= or cache_implementation="):
        model.generate(ids, max_new_tokens=2, cache_implementation="hf_efficiency_quantized", cache=QuantizedKVCache())
