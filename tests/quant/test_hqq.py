"""HQQ half-quadratic zero-point/scale optimization (pure tensor function)."""

import pytest
import torch

from hf_efficiency.quant.core.packing import packed_words, unpack
from hf_efficiency.quant.core.scheme import quantize_weight
from hf_efficiency.quant.methods.hqq import hqq_quantize


@pytest.fixture(autouse=True)
def _one_thread():
    # Many small elementwise passes: on a busy 2-core machine intra-op threading makes them up to
    # ~50x slower (thread hand-offs), while one thread runs this whole file in about a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _heavy_tailed(shape, seed=0, df=4.0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    # student-t(df) as normal / sqrt(chi2/df), built from a seeded generator
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((int(df),) + tuple(shape), generator=g).pow(2).sum(0)
    return z / (chi2 / df).sqrt() * std


def _mae(q, w):
    return (q.dequantize() - w).abs().mean().item()


def _reference(w, bits, g, iters, optimize_scale, p=0.7, beta=10.0, kappa=1.01):
    """Dense, literal transcription of the HQQ loop (float32 storage, groups divide `in`)."""
    out, n = w.shape
    wg = w.reshape(out, n // g, g)
    qmax = 2**bits - 1
    wmin, wmax = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s_inv = qmax / (wmax - wmin)  # HQQ's inverse scale and zero
    z = -wmin * s_inv
    best = torch.full_like(wmin, float("inf"))
    best_s, best_z = s_inv, z
    for it in range(iters + 1):
        wq = torch.round(wg * s_inv + z).clamp(0, qmax)
        wr = (wq - z) / s_inv
        err = (wg - wr).abs().mean(-1, keepdim=True)
        better = err < best
        if not better.any():
            break
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s_inv, best_s), torch.where(better, z, best_z)
        if it == iters:
            break
        r = wg - wr
        we = torch.sign(r) * torch.relu(r.abs() - r.abs().pow(p - 1) / beta)
        if optimize_scale:  # joint least squares of u*scale + minimum ~ W - W_e, scale step x1.5
            t = wg - we
            uc = wq - wq.mean(-1, keepdim=True)
            tc = t - t.mean(-1, keepdim=True)
            s_ls = (uc * tc).sum(-1, keepdim=True) / (uc * uc).sum(-1, keepdim=True)
            scale = 1 / s_inv
            scale = scale + 1.5 * (s_ls - scale)
            minimum = t.mean(-1, keepdim=True) - scale * wq.mean(-1, keepdim=True)
            s_inv, z = 1 / scale, -minimum / scale
        else:  # HQQ's closed-form zero step
            z = torch.mean(wq - (wg - we) * s_inv, -1, keepdim=True)
        beta *= kappa
    wr = (torch.round(wg * best_s + best_z).clamp(0, qmax) - best_z) / best_s
    return wr.reshape(out, n), 1 / best_s.squeeze(-1)


@pytest.mark.parametrize("bits,group_size,groups", [(4, 128, 5), (3, 64, 9), (2, None, 1), (8, 128, 5)])
def test_round_trip_shapes_and_code_consistency(bits, group_size, groups):
    w = _heavy_tailed((48, 576), seed=bits)
    q = hqq_quantize(w, bits, group_size)
    assert q.bits == bits and q.group_size == group_size and q.in_features == 576
    assert q.packed.shape == (48, packed_words(576, bits)) and q.packed.dtype == torch.int32
    assert q.scale.shape == q.minimum.shape == (48, groups)
    assert q.scale.dtype == q.minimum.dtype == torch.float16
    assert bool((q.scale > 0).all())
    # codes are exactly the nearest in-range codes for the *stored* scale and minimum
    g = 576 if group_size is None else group_size
    cols = torch.arange(576) // g
    s = q.scale.float()[:, cols]
    m = q.minimum.float()[:, cols]
    expected = torch.clamp(torch.round((w - m) / s), 0, 2**bits - 1)
    codes = unpack(q.packed, bits, 576).float()
    assert torch.equal(codes, expected)
    assert torch.equal(q.dequantize(), codes * s + m)


def test_beats_round_to_nearest_and_scale_step_beats_zero_only():
    w = _heavy_tailed((256, 576), seed=1)
    for bits, limit in ((4, 0.96), (3, 0.93), (2, 0.85)):
        rtn = _mae(quantize_weight(w, bits, 64, symmetric=False), w)
        zero_only = _mae(hqq_quantize(w, bits, 64, optimize_scale=False), w)
        joint = _mae(hqq_quantize(w, bits, 64, optimize_scale=True), w)
        assert zero_only < rtn, (bits, zero_only, rtn)
        assert joint < limit * rtn, (bits, joint, rtn)
        assert joint < zero_only, (bits, joint, zero_only)


def test_iters_zero_is_round_to_nearest_min_max():
    w = _heavy_tailed((32, 576), seed=2)
    q, r = hqq_quantize(w, 3, 128, iters=0), quantize_weight(w, 3, 128, symmetric=False)
    assert torch.equal(q.scale, r.scale) and torch.equal(q.minimum, r.minimum)
    assert torch.equal(q.packed, r.packed)


@pytest.mark.parametrize("optimize_scale", [False, True])
def test_matches_literal_transcription_with_active_shrinkage(optimize_scale):
    # unit-variance weights at 3 bits: residuals reach ~0.4 > beta**(-1/1.3) ~ 0.17, so the lp
    # shrinkage (sparse fix-up path) is active, unlike for typical LLM weight magnitudes
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    q = hqq_quantize(w, 3, 32, scale_dtype=torch.float32, optimize_scale=optimize_scale)
    ref_w, ref_scale = _reference(w, 3, 32, 20, optimize_scale)
    ref_err = (ref_w - w).abs().mean().item()
    assert _mae(q, w) == pytest.approx(ref_err, rel=1e-3)
    close = torch.isclose(q.scale, ref_scale, rtol=1e-3, atol=0)
    assert close.float().mean().item() > 0.95
    assert _mae(q, w) < _mae(quantize_weight(w, 3, 32, symmetric=False, scale_dtype=torch.float32), w)


def test_exclude_ignores_outliers():
    w = _heavy_tailed((64, 512), seed=4)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randperm(w.numel(), generator=gen)[:20]
    w_out = w.clone().view(-1)
    w_out[idx] = torch.where(torch.arange(20) % 2 == 0, 50.0, -50.0)
    w_out = w_out.view_as(w)
    exclude = torch.zeros_like(w, dtype=torch.bool).view(-1)
    exclude[idx] = True
    exclude = exclude.view_as(w)
    keep = ~exclude

    q_mask = hqq_quantize(w_out, 4, 64, exclude=exclude)
    q_plain = hqq_quantize(w_out, 4, 64)
    q_clean = hqq_quantize(w, 4, 64)  # the same weights without outliers
    # error on the non-excluded weights of the groups that hold an outlier
    hit = exclude.view(64, 8, 64).any(-1, keepdim=True).expand(64, 8, 64).reshape(64, 512) & keep

    def err(q, ref):
        return (q.dequantize() - ref).abs()[hit].mean().item()

    err_mask, err_plain, err_clean = err(q_mask, w_out), err(q_plain, w_out), err(q_clean, w)
    assert err_mask < 0.25 * err_plain  # plain: the outlier-wide grid flattens the group
    assert err_mask < 1.2 * err_clean
    # the fitted grid of every group stays (about) within the range of its non-excluded weights,
    # far from the +-50 outliers (the scale step may widen a grid slightly beyond min/max)
    lo = torch.where(keep, w_out, float("inf")).view(64, 8, 64).amin(-1)
    hi = torch.where(keep, w_out, -float("inf")).view(64, 8, 64).amax(-1)
    bottom, top = q_mask.minimum.float(), q_mask.minimum.float() + 15 * q_mask.scale.float()
    slack = 0.1 * (hi - lo)
    assert bool((bottom >= lo - slack).all() and (top <= hi + slack).all())


def test_padding_and_excluded_columns_are_inert():
    # a partial last group (576 = 4*128 + 64) must fit exactly like a full group whose extra 64
    # columns hold huge excluded values ...
    w = _heavy_tailed((32, 576), seed=6)
    exclude = torch.zeros(32, 640, dtype=torch.bool)
    exclude[:, 576:] = True
    q_pad = hqq_quantize(w, 3, 128)
    q_exc = hqq_quantize(torch.cat([w, torch.full((32, 64), 1e3)], 1), 3, 128, exclude=exclude)
    assert torch.equal(q_pad.scale, q_exc.scale) and torch.equal(q_pad.minimum, q_exc.minimum)
    assert torch.equal(q_pad.dequantize(), q_exc.dequantize()[:, :576])
    # ... and like a full group holding each of its 64 values twice (same min/max and means)
    q_dup = hqq_quantize(torch.cat([w, w[:, 512:]], 1), 3, 128)
    assert torch.allclose(q_pad.scale[:, 4].float(), q_dup.scale[:, 4].float(), rtol=2e-3)
    assert torch.allclose(q_pad.minimum[:, 4].float(), q_dup.minimum[:, 4].float(), rtol=2e-3, atol=1e-5)
    assert torch.equal(q_pad.scale[:, :4], q_dup.scale[:, :4])


def test_tiny_constant_and_fully_excluded_groups_stay_finite():
    w = torch.zeros(4, 96)
    w[1] = 0.25  # constant row
    w[2, :32] = torch.linspace(-1e-30, 1e-30, 32)  # sub-fp16 range
    w[3] = torch.linspace(-1, 1, 96)
    exclude = torch.zeros_like(w, dtype=torch.bool)
    exclude[3, 64:] = True  # a group with no fitted weight at all
    q = hqq_quantize(w, 2, 32, exclude=exclude)
    assert bool(torch.isfinite(q.scale.float()).all() and torch.isfinite(q.minimum.float()).all())
    deq = q.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert torch.allclose(deq[:3], w[:3], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    w = _heavy_tailed((64, 576), seed=7).to(dtype)
    q = hqq_quantize(w, 4, 128)
    ref = hqq_quantize(w.float(), 4, 128)
    assert torch.equal(q.packed, ref.packed) and torch.equal(q.scale, ref.scale)
    assert torch.equal(q.minimum, ref.minimum)
    assert _mae(q, w.float()) < _mae(quantize_weight(w, 4, 128, symmetric=False), w.float())


def test_bad_input_raises():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"bits=5"):
        hqq_quantize(w, 5, 32)
    with pytest.raises(ValueError, match=r"bits=1"):
        hqq_quantize(w, 1, 32)
    with pytest.raises(ValueError, match=r"\(2, 8, 64\)"):
        hqq_quantize(torch.randn(2, 8, 64), 4, 32)
    with pytest.raises(ValueError, match=r"\(64,\)"):
        hqq_quantize(w[0], 4, 32)
    with pytest.raises(ValueError, match=r"exclude has shape \(8, 32\)"):
        hqq_quantize(w, 4, 32, exclude=torch.zeros(8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"group_size=0"):
        hqq_quantize(w, 4, 0)
