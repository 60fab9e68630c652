"""Exact-number tests for int8 activations (W8A8): quantizers and int8_linear paths."""

from __future__ import annotations

import pytest
import torch

from hf_efficiency.quant.core import activation as A


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    s_w = w.abs().amax(dim=1) / 127
    return torch.round(w / s_w[:, None]).clamp(-127, 127).to(torch.int8), s_w


def _acts(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3 % k] *= 20  # an outlier channel
    return x


# --------------------------------------------------------------------------- quantizers


def test_per_token_codes_and_scales_hand_made():
    # row 0: amax 127 -> scale exactly 1; row 1: amax 254 -> scale exactly 2 (ties round to even)
    x = torch.tensor([[127.0, -63.4, 10.6, 0.5, 1.5], [-254.0, 3.0, -5.0, 1.0, 253.0]])
    q, s = A.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == (2, 1)
    assert s.flatten().tolist() == [1.0, 2.0]
    assert q.tolist() == [[127, -63, 11, 0, 2], [-127, 2, -2, 0, 126]]


def test_per_token_keeps_leading_dims_and_bf16_input():
    x = torch.tensor([[[127.0, -1.0], [0.0, 2.54]]], dtype=torch.bfloat16)
    q, s = A.quantize_per_token(x)
    assert q.shape == (1, 2, 2) and s.shape == (1, 2, 1) and s.dtype == torch.float32
    assert q[0, 0].tolist() == [127, -1]
    assert q[0, 1].tolist() == [0, 127]


def test_per_token_zero_rows_are_safe():
    x = torch.zeros(3, 8)
    x[1, 2] = -4.0
    q, s = A.quantize_per_token(x)
    assert torch.isfinite(s).all()
    assert s[0].item() == 1.0 and s[2].item() == 1.0
    assert (q[0] == 0).all() and (q[2] == 0).all()
    assert q[1, 2].item() == -127
    q_w, s_w = _weights(4, 8)
    y = A.int8_linear(q, s, q_w, s_w, path="int_mm")
    assert torch.isfinite(y).all() and (y[0] == 0).all()


def test_per_token_codes_stay_in_symmetric_range():
    x = _acts(64, 576) * 1e3
    q, s = A.quantize_per_token(x)
    assert q.min().item() >= -127 and q.max().item() <= 127
    assert (q.abs().amax(dim=-1) == 127).all()  # the max of every row maps to +-127


def test_static_quantization_clamps_and_rounds():
    x = torch.tensor([0.0, 1.0, -1.25, 2.5, 3.5, 300.0, -1e6])
    q = A.quantize_static(x, torch.tensor(0.5))
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, -2, 5, 7, 127, -127]  # -2.5 -> -2 (half to even), clamped ends


def test_static_quantization_rejects_non_scalar_scale():
    with pytest.raises(ValueError):
        A.quantize_static(torch.ones(4), torch.tensor([1.0, 2.0]))


def test_static_scale_matches_torch_quantile():
    v = torch.arange(1, 101, dtype=torch.float32)  # 1..100
    for p in (50.0, 99.0, 99.9):
        expected = torch.quantile(v, p / 100) / 127
        assert A.static_scale_from_samples(v, p).item() == expected.item()
    assert A.static_scale_from_samples(v, 100).item() == (torch.tensor(100.0) / 127).item()
    assert A.static_scale_from_samples(-v, 100).item() == (torch.tensor(100.0) / 127).item()  # abs taken
    assert A.static_scale_from_samples(v, 99).shape == ()


def test_static_scale_fallbacks_and_validation():
    assert A.static_scale_from_samples(torch.zeros(10), 99).item() == 1.0
    sparse = torch.zeros(1000)
    sparse[0] = 12.7
    assert A.static_scale_from_samples(sparse, 50).item() == pytest.approx(0.1)  # max/127 fallback
    for bad in (0, -1, 100.5):
        with pytest.raises(ValueError):
            A.static_scale_from_samples(torch.ones(3), bad)


def test_static_scale_subsamples_huge_inputs(monkeypatch):
    monkeypatch.setattr(A, "QUANTILE_MAX_ELEMENTS", 1000)
    v = torch.linspace(0, 1, 100_000)
    s = A.static_scale_from_samples(v, 50)
    assert abs(s.item() * 127 - 0.5) < 0.05
    assert A.static_scale_from_samples(v, 50).item() == s.item()  # deterministic
    assert A.static_scale_from_samples(v, 100).item() == (torch.tensor(1.0) / 127).item()


# --------------------------------------------------------------------------- int8_linear


SHAPES = [(1, 576, 192), (16, 576, 576), (33, 1536, 576), (3, 7, 5)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("path", A.available_paths("cpu"))
def test_paths_match_int32_reference(path, m, k, n):
    q_w, s_w = _weights(n, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    q_x, s_x = A.quantize_per_token(_acts(m, k))
    ref = A.int8_linear_reference(q_x, s_x, q_w, s_w, bias)
    # the reference itself equals the float64 truth within float32 rounding
    truth = (q_x.double() @ q_w.double().t()) * s_x.double() * s_w.double() + bias.double()
    assert torch.allclose(ref.double(), truth, rtol=1e-6, atol=1e-6)
    prepared = A.prepare_weight(q_w, s_w, path)
    y = A.int8_linear(q_x, s_x, q_w, s_w, bias, path=path, prepared=prepared)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if path in ("int_mm", "onednn"):
        assert torch.equal(y, ref)
    else:  # dequant: float32 sums of non-integer products
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("path", A.available_paths("cpu"))
def test_paths_static_scale_leading_dims_and_out_dtype(path):
    q_w, s_w = _weights(24, 40)
    x = _acts(6, 40).reshape(2, 3, 40)
    s_x = A.static_scale_from_samples(x, 99.0)
    q_x = A.quantize_static(x, s_x)
    ref = A.int8_linear_reference(q_x, s_x, q_w, s_w)
    y = A.int8_linear(q_x, s_x, q_w, s_w, path=path)  # prepared built on the fly
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    yb = A.int8_linear(q_x, s_x, q_w, s_w, path=path, out_dtype=torch.bfloat16)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_int_mm_exact_for_extreme_codes():
    # every product +-127*127 in one direction: the largest int32 sums, still exact
    k = 1536
    q_x = torch.full((2, k), 127, dtype=torch.int8)
    q_x[1] = -127
    q_w = torch.full((8, k), 127, dtype=torch.int8)
    one_x, one_w = torch.ones(2, 1), torch.ones(8)
    acc = A.int8_linear(q_x, one_x, q_w, one_w, path="int_mm")
    assert acc[0, 0].item() == float(k * 127 * 127) and acc[1, 0].item() == -float(k * 127 * 127)
    assert torch.equal(acc, A.int8_linear_reference(q_x, one_x, q_w, one_w))


def test_unknown_path_raises_with_allowed_values():
    q_w, s_w = _weights(8, 16)
    q_x, s_x = A.quantize_per_token(_acts(2, 16))
    with pytest.raises(ValueError) as e:
        A.int8_linear(q_x, s_x, q_w, s_w, path="fbgemm")
    for allowed in A.INT8_LINEAR_PATHS:
        assert allowed in str(e.value)
    with pytest.raises(ValueError):
        A.prepare_weight(q_w, s_w, "cuda_int8")


def test_shape_and_dtype_validation():
    q_w, s_w = _weights(8, 16)
    q_x, s_x = A.quantize_per_token(_acts(2, 16))
    with pytest.raises(ValueError):
        A.int8_linear(q_x[:, :15], s_x, q_w, s_w)
    with pytest.raises(TypeError):
        A.int8_linear(q_x.float(), s_x, q_w, s_w)
    with pytest.raises(ValueError):
        A.int8_linear(q_x, s_x, q_w, s_w[:7])


# --------------------------------------------------------------------------- int_mm_padded


@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (1, 5, 3), (16, 576, 576), (17, 24, 16), (3, 577, 193), (40, 9, 8)])
def test_int_mm_padded_exact_for_any_shape(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    q_x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    q_w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ref = q_x.int() @ q_w.int().t()
    for pad in (True, None, False):  # True exercises the CUDA padding on CPU
        out = A.int_mm_padded(q_x, q_w.t(), pad=pad)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out, ref)


def test_int_mm_padded_accepts_prepadded_weight():
    g = torch.Generator().manual_seed(3)
    q_x = torch.randint(-127, 128, (2, 13), dtype=torch.int8, generator=g)
    q_w = torch.randint(-127, 128, (5, 13), dtype=torch.int8, generator=g)
    w_p = A.pad_int_mm_weight(q_w.t())
    assert w_p.shape == (16, 8) and w_p.t().is_contiguous()
    ref = q_x.int() @ q_w.int().t()
    for pad in (True, False):
        out = A.int_mm_padded(q_x, w_p, pad=pad)
        assert out.shape == (2, 8) and torch.equal(out[:, :5], ref) and (out[:, 5:] == 0).all()
    # int8_linear slices a pre-padded weight back to n = len(s_w)
    s_w = torch.rand(5) + 0.1
    y = A.linear_int_mm(q_x, torch.ones(2, 1), w_p, s_w)
    assert torch.equal(y, A.int8_linear_reference(q_x, torch.ones(2, 1), q_w, s_w))


# --------------------------------------------------------------------------- non-W8A8 references


def test_fbgemm_dynamic_is_close_but_not_our_numerics():
    m, k, n = 16, 576, 192
    q_w, s_w = _weights(n, k)
    x = _acts(m, k)
    q_x, s_x = A.quantize_per_token(x)
    ref = A.int8_linear_reference(q_x, s_x, q_w, s_w)
    y = A.linear_fbgemm_dynamic(x, A.fbgemm_prepack(q_w, s_w))
    err = (y - ref).abs().max().item() / ref.abs().max().item()
    assert err < 0.1  # same ballpark (per-tensor uint8 activations) ...
    assert not torch.equal(y, ref)  # ... but different numerics


def test_weight_int8pack_is_weight_only():
    m, k, n = 4, 64, 16
    q_w, s_w = _weights(n, k)
    x = _acts(m, k)
    y = A.linear_weight_int8pack(x, q_w, s_w)
    w = A.dequantize_int8_weight(q_w, s_w)
    assert torch.allclose(y, x @ w.t(), rtol=1e-4, atol=1e-4)
