"""Pure tensor functions: packing, quantize/dequantize, clip search."""

import pytest
import torch

from hf_efficiency.quant.core.packing import pack, packed_words, unpack
from hf_efficiency.quant.core.scheme import dequantize_codes, quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 96, 100, 576])
def test_pack_unpack_round_trip_and_dense_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (3, packed_words(n, bits)) == (3, -(-n // 32) * bits)
    assert torch.equal(unpack(words, bits, n).long(), codes)


def test_pack_layout_is_little_endian_bit_stream():
    # 4-bit codes 1..8 -> one word 0x87654321; 3-bit code 7 at index 10 straddles words 0 and 1.
    assert pack(torch.arange(1, 9).view(1, 8), 4)[0, 0].item() & 0xFFFFFFFF == 0x87654321
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 7  # bits 30..32
    w = pack(codes, 3)[0]
    assert (w[0].item() & 0xFFFFFFFF) == 0b11 << 30 and w[1].item() == 1 and w[2].item() == 0


def test_pack_rejects_unsupported_bits():
    with pytest.raises(ValueError, match=r"bits=7 is not supported; allowed values: \(2, 3, 4, 5, 6, 8\)"):
        pack(torch.zeros(1, 4, dtype=torch.long), 7)


def test_asymmetric_exact_numbers():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    q = quantize_weight(w, 2, None, False, scale_dtype=torch.float32)
    assert q.scale.tolist() == [[1.0]] and q.minimum.tolist() == [[0.0]]
    assert unpack(q.packed, 2, 4).tolist() == [[0, 1, 2, 3]]
    assert torch.equal(q.dequantize(), w)


def test_symmetric_exact_numbers():
    w = torch.tensor([[-7.0, -3.5, 0.0, 7.0]])
    q = quantize_weight(w, 4, None, True, scale_dtype=torch.float32)
    assert q.minimum is None and q.scale.tolist() == [[1.0]]
    assert unpack(q.packed, 4, 4).tolist() == [[1, 4, 8, 15]]  # round(-3.5) = -4 (half to even)
    assert q.dequantize().tolist() == [[-7.0, -4.0, 0.0, 7.0]]


def test_int8_per_channel_error_bound_and_group_shapes():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    q = quantize_weight(w, 8, None, True)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-3 * step).all()
    q4 = quantize_weight(w, 4, 64, False)
    assert q4.scale.shape == (16, 4) and q4.minimum.shape == (16, 4) and q4.packed.shape == (16, 32)


def test_partial_last_group_uses_only_real_columns():
    # 96 columns with groups of 64: the second group holds 32 real columns.
    torch.manual_seed(1)
    w = torch.randn(4, 96)
    w[:, 64:] *= 0.01  # a small-magnitude last group keeps its own small scale
    q = quantize_weight(w, 4, 64, False, scale_dtype=torch.float32)
    assert q.scale.shape == (4, 2)
    assert torch.allclose(q.scale[:, 1], (w[:, 64:].amax(1) - w[:, 64:].amin(1)) / 15)
    assert (q.dequantize()[:, 64:] - w[:, 64:]).abs().max() < 0.01


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_mse_clip_never_worse_and_better_with_outliers(bits):
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.02
    w[torch.rand_like(w) < 0.01] *= 20
    errs = {c: ((quantize_weight(w, bits, 128, False, c).dequantize() - w) ** 2).sum().item() for c in ("none", "mse")}
    assert errs["mse"] < {4: 0.95, 3: 0.9, 2: 0.8}[bits] * errs["none"]


def test_dequantize_codes_matches_formula_and_dtype():
    codes = torch.tensor([[0, 15, 3, 4]], dtype=torch.uint8)
    scale = torch.tensor([[0.5, 2.0]])
    minimum = torch.tensor([[-1.0, 1.0]])
    w = dequantize_codes(codes, scale[:, :1], minimum[:, :1], 4, None, torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.float().tolist() == [[-1.0, 6.5, 0.5, 1.0]]
    sym = dequantize_codes(codes, scale[:, :1], None, 4, None)
    assert sym.tolist() == [[-4.0, 3.5, -2.5, -2.0]]


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected a 2-D weight, got shape \(4,\)"):
        quantize_weight(torch.zeros(4), 4, None, False)
    with pytest.raises(ValueError, match="clip='max' is not allowed"):
        quantize_weight(torch.zeros(2, 4), 4, None, False, clip="max")
