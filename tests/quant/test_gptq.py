"""GPTQ (pure tensor function): lower output error than RTN, agreement with a textbook
per-column reference, exact RTN equivalence when H is diagonal, format consistency, dead inputs,
excluded (outlier) weights and input validation."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_efficiency.quant.core.packing import packed_words, unpack
from hf_efficiency.quant.core.scheme import fit_group_params, quantize_weight
from hf_efficiency.quant.methods.gptq import gptq_quantize

N_TOKENS, IN, OUT = 2048, 256, 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # GPTQ is a long sequence of small ops; on a shared 2-core machine intra-op threading makes each
    # parallel region wait for a descheduled thread (several ms apiece). One thread keeps this
    # module fast and deterministic; the previous setting is restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated calibration inputs with a few large-magnitude channels, H = X^T X / n, and W."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(IN, IN, generator=g) / IN**0.5
    x = torch.randn(N_TOKENS, IN, generator=g) @ a
    x[:, [3, 70, 200]] *= 12.0  # outlier input channels
    w = torch.randn(OUT, IN, generator=g) * 0.05
    return x, x.T @ x / N_TOKENS, w


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).sum())


def codes_of(q) -> torch.Tensor:
    return unpack(q.packed, q.bits, q.in_features).long()


def reference_gptq(w, h, bits, group_size, symmetric, act_order, damp=0.01):
    """Textbook GPTQ: one column at a time over the whole matrix, no blocking, explicit H^-1."""
    w, h = w.clone().float(), h.clone().float()
    out, n = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = n if group_size is None else group_size
    if act_order:
        ng = -(-n // g)
        wg = torch.nn.functional.pad(w, (0, ng * g - n)).reshape(out, ng, g)
        valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, ng * g - n)).reshape(1, ng, g)
        static = fit_group_params(wg, valid, bits, symmetric, torch.float16, "none", 20, 0.5)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(n)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    for j in range(n):
        if act_order:
            gi = int(perm[j]) // g
            s, m = static[0][:, gi, 0], None if static[1] is None else static[1][:, gi, 0]
        elif j % g == 0:
            s, m = fit_group_params(w[:, j : j + g].unsqueeze(1), None, bits, symmetric, torch.float16, "none", 20, 0.5)
            s, m = s.reshape(out), None if m is None else m.reshape(out)
        col = w[:, j]
        if m is None:
            q = torch.clamp(torch.round(col / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
        else:
            q = torch.clamp(torch.round((col - m) / s), 0, 2**bits - 1) * s + m
        q_all[:, j] = q
        w[:, j:] -= ((col - q) / u[j, j])[:, None] * u[j, j:][None, :]
    return q_all[:, torch.argsort(perm)] if act_order else q_all


# ------------------------------------------------------------------------------ quality


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act_order"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_output_error_is_lower_than_rtn(layer, bits, symmetric, act_order):
    x, h, w = layer
    rtn = out_err(x, w, quantize_weight(w, bits, 64, symmetric).dequantize())
    q, kept = gptq_quantize(w, h, bits, 64, symmetric, act_order=act_order)
    gptq = out_err(x, w, q.dequantize())
    print(
        f"bits={bits} g64 sym={symmetric} act_order={act_order}: rtn={rtn:.1f} gptq={gptq:.1f} ratio={gptq / rtn:.3f}"
    )
    assert kept is None
    # Upper bounds on gptq/rtn (measured: act-order 0.25-0.31; sequential 0.42-0.50 at 3-4 bits,
    # 0.71 at 2 bits asymmetric).
    bound = 0.4 if act_order else 0.6 if bits > 2 else 0.8
    if (bits, symmetric, act_order) == (2, True, False):
        # Known GPTQ weakness, not an implementation bug (the textbook reference above gives the
        # same 1.02): the 2-bit symmetric grid {-2,-1,0,1}*s saturates once error updates push
        # weights past the range fitted at the group's start, and with strong outlier input
        # channels that error snowballs. act-order (outlier channels first) fixes it: 0.31.
        bound = 1.1
    assert gptq < bound * rtn


@pytest.mark.parametrize(
    "bits,group_size,symmetric,act_order,block_size",
    [
        (4, 64, False, False, 128),
        (3, 64, True, False, 16),
        (2, 64, False, True, 128),
        (4, 48, True, True, 32),
        (4, 48, False, False, 40),
        (3, None, False, False, 128),
    ],
)
def test_blocked_sweep_matches_textbook_reference(layer, bits, group_size, symmetric, act_order, block_size):
    # Blocking, lazy updates, groups straddling blocks and act-order un-permutation must not change
    # the algorithm: only float rounding differs, which may flip a rare rounding decision.
    x, h, w = layer
    ref = reference_gptq(w, h, bits, group_size, symmetric, act_order)
    q, _ = gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order, block_size=block_size)
    got = q.dequantize()
    assert (got == ref).float().mean() > 0.99
    assert out_err(x, w, got) == pytest.approx(out_err(x, w, ref), rel=0.02)


# ------------------------------------------------------------------------------ RTN equivalence


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("n,group_size,bits", [(256, 64, 4), (576, 128, 3), (576, None, 2), (100, 32, 8)])
def test_identity_hessian_gives_exactly_rtn(n, group_size, bits, symmetric):
    # With H = I nothing is propagated, so codes and params must be bit-identical to RTN: the group
    # fit (ranges, stored-dtype rounding, partial last group) matches scheme.quantize_weight.
    w = torch.randn(64, n, generator=torch.Generator().manual_seed(n)) * 0.1
    rtn = quantize_weight(w, bits, group_size, symmetric)
    q, _ = gptq_quantize(w, torch.eye(n), bits, group_size, symmetric)
    assert torch.equal(codes_of(q), codes_of(rtn))
    assert torch.equal(q.scale, rtn.scale) and q.scale.dtype == torch.float16
    assert (q.minimum is None) == symmetric
    if not symmetric:
        assert torch.equal(q.minimum, rtn.minimum)


@pytest.mark.parametrize("clip", ["none", "mse"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_diagonal_hessian_with_act_order_gives_exactly_rtn(clip, symmetric):
    # Diagonal H: still no propagation, but act-order permutes columns (distinct diag entries);
    # static groups + un-permutation must reproduce RTN (also with scheme's MSE clip search).
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 576, generator=gen) * 0.1
    h = torch.diag(torch.rand(576, generator=gen) + 0.1)
    rtn = quantize_weight(w, 4, 128, symmetric, clip=clip)
    for act_order in (True, False):
        q, _ = gptq_quantize(w, h, 4, 128, symmetric, act_order=act_order, clip=clip)
        assert torch.equal(codes_of(q), codes_of(rtn)), act_order
        assert torch.equal(q.scale, rtn.scale), act_order


# ------------------------------------------------------------------------------ format


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act_order"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [128, None])
def test_result_is_a_consistent_quantized_weight(group_size, symmetric, act_order):
    # in=576 with g=128: 4 full groups + a partial one of 64 columns.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 576, generator=gen) @ (torch.randn(576, 576, generator=gen) / 24)
    h = x.T @ x / 1024
    w = (torch.randn(48, 576, generator=gen) * 0.05).to(torch.bfloat16)
    w_before, h_before = w.clone(), h.clone()
    q, kept = gptq_quantize(w, h, 4, group_size, symmetric, act_order=act_order, scale_dtype=torch.bfloat16)
    groups = 5 if group_size == 128 else 1
    assert kept is None
    assert q.bits == 4 and q.group_size == group_size and q.in_features == 576
    assert q.packed.dtype == torch.int32 and q.packed.shape == (48, packed_words(576, 4))
    assert q.scale.shape == (48, groups) and q.scale.dtype == torch.bfloat16
    if symmetric:
        assert q.minimum is None
    else:
        assert q.minimum.shape == (48, groups) and q.minimum.dtype == torch.bfloat16
    deq = q.dequantize()
    assert deq.shape == (48, 576) and torch.isfinite(deq).all()
    assert torch.equal(w, w_before) and torch.equal(h, h_before)  # inputs untouched
    wf = w.float()
    assert out_err(x, wf, deq) < out_err(x, wf, quantize_weight(wf, 4, group_size, symmetric).dequantize())


# ------------------------------------------------------------------------------ dead inputs, damping


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act_order"])
def test_dead_inputs_do_not_produce_nan(layer, act_order):
    x, _, w = layer
    x = x.clone()
    x[:, [0, 17, 255]] = 0.0  # inputs that never fire: zero rows/cols in H
    h = x.T @ x / N_TOKENS
    q, _ = gptq_quantize(w, h, 4, 64, True, act_order=act_order)
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    # GPTQ zeroes dead columns and nothing couples into them; 0 is on the symmetric grid.
    assert torch.equal(deq[:, [0, 17, 255]], torch.zeros(OUT, 3))
    assert out_err(x, w, deq) < out_err(x, w, quantize_weight(w, 4, 64, True).dequantize())
    # an all-zero Hessian (no calibration signal at all) still works
    q0, _ = gptq_quantize(w, torch.zeros(IN, IN), 3, 64, False)
    assert torch.isfinite(q0.dequantize()).all()


def test_rank_deficient_hessian_is_handled_by_damping(layer):
    _, _, w = layer
    x = torch.randn(16, IN, generator=torch.Generator().manual_seed(3))  # 16 tokens << 256 inputs
    q, _ = gptq_quantize(w, x.T @ x / 16, 4, 64, False)
    assert torch.isfinite(q.dequantize()).all()


def test_indefinite_hessian_retries_then_raises(layer, caplog):
    _, _, w = layer
    with caplog.at_level(logging.WARNING, logger="hf_efficiency.quant.methods.gptq"):
        with pytest.raises(RuntimeError, match="not positive definite"):
            gptq_quantize(w, -torch.eye(IN), 4, 64, False)
    assert sum("retrying with damp" in r.getMessage() for r in caplog.records) == 3


# ------------------------------------------------------------------------------ excluded weights


def _outlier_mask(w: torch.Tensor, h: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    sal = (w.abs() * torch.diagonal(h).sqrt()).flatten()
    mask = torch.zeros_like(sal, dtype=torch.bool)
    mask[sal.topk(int(frac * sal.numel())).indices] = True
    return mask.view_as(w)


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act_order"])
def test_excluded_weights_are_kept_and_compensated(layer, act_order):
    x, h, w = layer
    ex = _outlier_mask(w, h)
    q_plain, _ = gptq_quantize(w, h, 3, 64, False, act_order=act_order)
    q, kept = gptq_quantize(w, h, 3, 64, False, act_order=act_order, exclude=ex)
    assert kept.dtype == torch.float32 and kept.shape == w.shape
    assert torch.equal(kept[~ex], torch.zeros(int((~ex).sum())))
    assert torch.isfinite(q.dequantize()).all()
    w_hat = torch.where(ex, kept, q.dequantize())
    err_kept = out_err(x, w, w_hat)
    err_plain = out_err(x, w, q_plain.dequantize())
    # naive: GPTQ without exclusions, then paste the original outlier values back in
    err_paste = out_err(x, w, torch.where(ex, w, q_plain.dequantize()))
    print(f"act_order={act_order}: plain={err_plain:.1f} paste-outliers={err_paste:.1f} kept={err_kept:.1f}")
    assert err_kept < err_plain and err_kept < err_paste
    # kept values are the error-updated weights, not the originals (except in the first column
    # swept, which has received no update yet)
    first = int(torch.argmax(torch.diagonal(h))) if act_order else 0
    assert torch.equal(kept[:, first][ex[:, first]], w[:, first][ex[:, first]])
    later = ex.clone()
    later[:, first] = False
    assert not torch.allclose(kept[later], w[later])


def test_excluded_weights_do_not_widen_group_range():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 128, generator=gen) * 0.1
    w[2, 5] = 50.0  # a huge outlier in group 0 of row 2
    ex = torch.zeros_like(w, dtype=torch.bool)
    ex[2, 5] = True
    ex[6, 64:] = True  # a whole group row excluded: any finite params
    w_in_range = w.clone()
    w_in_range[2, 5] = w[2, 6]  # same min/max as the non-excluded weights of that group row
    q, kept = gptq_quantize(w, torch.eye(128), 4, 64, False, exclude=ex)
    rtn = quantize_weight(w_in_range, 4, 64, False)
    assert torch.equal(q.scale[:6], rtn.scale[:6]) and torch.equal(q.minimum[:6], rtn.minimum[:6])
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.minimum).all()
    assert torch.equal(kept[ex], w[ex])  # H = I: nothing propagates, kept = original values
    deq = q.dequantize()
    assert torch.equal(deq[~ex], rtn.dequantize()[~ex])


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), r"bits=5 is not supported"),
        (dict(weight=torch.zeros(8)), r"2-D weight.*\(8,\)"),
        (dict(hessian=torch.eye(7)), r"hessian shape \(7, 7\).*\(16, 16\)"),
        (dict(group_size=0), r"group_size=0"),
        (dict(group_size=-64), r"group_size=-64"),
        (dict(clip="max"), r"clip='max'"),
        (dict(block_size=0), r"block_size=0"),
        (dict(damp=-0.1), r"damp=-0.1"),
        (dict(exclude=torch.zeros(4, 16)), r"exclude must be a bool tensor of shape \(4, 16\)"),
        (dict(exclude=torch.zeros(4, 8, dtype=torch.bool)), r"\(4, 8\) torch.bool"),
        (dict(hessian=torch.full((16, 16), float("nan"))), r"hessian contains nan"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kwargs, match):
    args = dict(weight=torch.randn(4, 16), hessian=torch.eye(16), bits=4, group_size=8, symmetric=False)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gptq_quantize(
            args.pop("weight"),
            args.pop("hessian"),
            args.pop("bits"),
            args.pop("group_size"),
            args.pop("symmetric"),
            **extra,
        )
