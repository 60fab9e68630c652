"""Exact-math tests for hf_efficiency.distill.losses (CPU, tiny tensors)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hf_efficiency.distill.losses import (
    RELATION_LOSSES,
    RESPONSE_LOSSES,
    attention_map_loss,
    common_vocab,
    hidden_state_loss,
    mutual_kl_loss,
    pool_hidden,
    reduce_tokens,
    response_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    token_mask,
    token_similarity_loss,
    topk_response_loss,
    uniform_layer_map,
)

B, T, V = 3, 5, 11


def _logits(seed: int, shape=(B, T, V), scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _mask() -> torch.Tensor:
    return torch.tensor(
        [
            [True, True, True, True, False],
            [False, True, True, False, False],
            [True, False, True, True, True],
        ]
    )


def _per_token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per position, via torch's kl_div."""
    return F.kl_div(
        F.log_softmax(q_logits.double(), -1),
        F.log_softmax(p_logits.double(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_token[mask].sum() / mask.sum()


# ----------------------------------------------------------------------------- helpers


def test_token_mask_hf_shift() -> None:
    labels = torch.tensor([[5, 6, -100, 7, -100], [-100, -100, 1, 2, 3]])
    expected = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    assert torch.equal(token_mask(labels), expected)
    assert token_mask(labels).dtype == torch.bool


def test_common_vocab_slices_to_min() -> None:
    s, t = common_vocab(torch.zeros(1, 2, 7), torch.zeros(1, 2, 9))
    assert s.shape[-1] == t.shape[-1] == 7
    s, t = common_vocab(torch.zeros(1, 2, 12), torch.zeros(1, 2, 9))
    assert s.shape[-1] == t.shape[-1] == 9


def test_reduce_tokens() -> None:
    per = torch.arange(15, dtype=torch.float32).reshape(B, T)
    mask = _mask()
    total = per[mask].sum()
    assert torch.allclose(reduce_tokens(per, mask), total / mask.sum())
    assert torch.allclose(reduce_tokens(per, mask, 20), total / 20)
    assert torch.allclose(reduce_tokens(per, mask, torch.tensor(20)), total / 20)
    # no valid token: 0, not nan
    assert reduce_tokens(per, torch.zeros_like(mask)).item() == 0.0


# ----------------------------------------------------------------------------- response losses


def test_forward_kl_matches_double_loop_and_kl_div() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    loss = response_loss(s, t, mask, loss="forward_kl")
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                n += 1
                for v in range(V):
                    total += pt[b, i, v].item() * math.log(pt[b, i, v].item() / ps[b, i, v].item())
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    assert loss.item() == pytest.approx(_masked_mean(_per_token_kl(t, s), mask).item(), rel=1e-5)


def test_kl_zero_on_identical() -> None:
    s = _logits(0)
    for name in RESPONSE_LOSSES:
        if name == "soft_ce":
            continue
        assert response_loss(s, s.clone(), _mask(), loss=name).item() == pytest.approx(0.0, abs=1e-6)


def test_reverse_kl_is_swapped_forward_kl() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    rev = response_loss(s, t, mask, loss="reverse_kl")
    fwd_swapped = response_loss(t, s, mask, loss="forward_kl")
    assert rev.item() == pytest.approx(fwd_swapped.item(), rel=1e-6)
    assert rev.item() == pytest.approx(_masked_mean(_per_token_kl(s, t), mask).item(), rel=1e-5)


def test_soft_ce_minus_forward_kl_is_teacher_entropy() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    ce = response_loss(s, t, mask, loss="soft_ce")
    kl = response_loss(s, t, mask, loss="forward_kl")
    pt = torch.softmax(t.double(), -1)
    entropy = -(pt * pt.log()).sum(-1)
    assert (ce - kl).item() == pytest.approx(_masked_mean(entropy, mask).item(), rel=1e-5)


def test_jsd_symmetric_bounded_and_beta_endpoints() -> None:
    s, t, mask = _logits(0, scale=8.0), _logits(1, scale=8.0), _mask()
    a = response_loss(s, t, mask, loss="jsd", beta=0.5)
    b = response_loss(t, s, mask, loss="jsd", beta=0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # hand reference for beta=0.5
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    m = 0.5 * (ps + pt)
    ref = 0.5 * (pt * (pt / m).log()).sum(-1) + 0.5 * (ps * (ps / m).log()).sum(-1)
    assert a.item() == pytest.approx(_masked_mean(ref, mask).item(), rel=1e-4)
    # per token <= ln 2
    for bi in range(B):
        for ti in range(T):
            one = torch.zeros(B, T, dtype=torch.bool)
            one[bi, ti] = True
            assert response_loss(s, t, one, loss="jsd", beta=0.5).item() <= math.log(2) + 1e-6
    # endpoints: GKD/TRL convention
    assert torch.equal(response_loss(s, t, mask, loss="jsd", beta=0.0), response_loss(s, t, mask, loss="forward_kl"))
    assert torch.equal(response_loss(s, t, mask, loss="jsd", beta=1.0), response_loss(s, t, mask, loss="reverse_kl"))
    # generalized beta matches the definition
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    ref = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    got = response_loss(s, t, mask, loss="jsd", beta=beta)
    assert got.item() == pytest.approx(_masked_mean(ref, mask).item(), rel=1e-4)


def test_temperature_scaling() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    got = response_loss(s, t, mask, loss="forward_kl", temperature=2.0)
    ref = 4.0 * _masked_mean(_per_token_kl(t / 2.0, s / 2.0), mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got = response_loss(s, t, mask, loss="reverse_kl", temperature=2.0)
    ref = 4.0 * _masked_mean(_per_token_kl(s / 2.0, t / 2.0), mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # mse ignores temperature
    assert torch.equal(response_loss(s, t, mask, loss="mse", temperature=3.0), response_loss(s, t, mask, loss="mse"))


def test_mse_exact() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    ref = _masked_mean((s - t).pow(2).mean(-1), mask)
    assert response_loss(s, t, mask, loss="mse").item() == pytest.approx(ref.item(), rel=1e-6)


def test_response_loss_errors() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl.*jsd.*soft_ce.*mse"):
        response_loss(s, t, mask, loss="kl")
    with pytest.raises(ValueError, match="temperature"):
        response_loss(s, t, mask, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        response_loss(s, t, mask, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match="mask shape"):
        response_loss(s, t, mask[:, :-1])


def test_num_items_and_gradient_accumulation_invariant() -> None:
    s, t, mask = _logits(0, (4, T, V)), _logits(1, (4, T, V)), torch.rand(4, T) > 0.3
    mask[0, 0] = True
    n = int(mask.sum())
    for name in RESPONSE_LOSSES:
        per = response_loss(s, t, mask, loss=name, num_items_in_batch=1)  # = plain sum
        assert response_loss(s, t, mask, loss=name, num_items_in_batch=n).item() == pytest.approx(
            per.item() / n, rel=1e-6
        )
        full = response_loss(s, t, mask, loss=name)
        nt = torch.tensor(n)
        split = response_loss(s[:2], t[:2], mask[:2], loss=name, num_items_in_batch=nt) + response_loss(
            s[2:], t[2:], mask[2:], loss=name, num_items_in_batch=nt
        )
        assert split.item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("name", RESPONSE_LOSSES)
def test_masked_garbage_does_not_leak(name: str) -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    clean = response_loss(s, t, mask, loss=name, temperature=1.5)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = float("inf")
    s_bad[0, 4, :3] = float("nan")
    s_bad[1, 0, 1] = float("-inf")
    t_bad[~mask] = float("nan")
    t_bad[2, 1, 0] = float("-inf")
    s_bad.requires_grad_(True)
    loss = response_loss(s_bad, t_bad, mask, loss=name, temperature=1.5)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s_bad.grad).all()
    assert (s_bad.grad[~mask] == 0).all()


def test_teacher_with_padded_vocab() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    t_pad = torch.cat([t, _logits(2, (B, T, 5))], dim=-1)
    for name in RESPONSE_LOSSES:
        assert torch.equal(response_loss(s, t_pad, mask, loss=name), response_loss(s, t, mask, loss=name))
    s_pad = torch.cat([s, _logits(3, (B, T, 7))], dim=-1)
    assert torch.equal(response_loss(s_pad, t, mask), response_loss(s, t, mask))


def test_bf16_inputs_compute_in_fp32() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    for name in RESPONSE_LOSSES:
        sb, tb = s.bfloat16(), t.bfloat16()
        got = response_loss(sb, tb, mask, loss=name, temperature=2.0)
        assert got.dtype == torch.float32
        assert torch.equal(got, response_loss(sb.float(), tb.float(), mask, loss=name, temperature=2.0))
        ref = response_loss(s, t, mask, loss=name, temperature=2.0)
        assert got.item() == pytest.approx(ref.item(), rel=2e-2, abs=1e-3)
    got = hidden_state_loss(s.half(), t.half(), kind="cosine")
    assert got.dtype == torch.float32


# ----------------------------------------------------------------------------- top-k


def _topk_cache(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return F.log_softmax(t, -1).topk(k, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_full_vocab_equals_response_loss(temperature: float) -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    lp, idx = _topk_cache(t, V)
    for name in ("forward_kl", "soft_ce"):
        got = topk_response_loss(s, lp, idx, mask, loss=name, temperature=temperature)
        ref = response_loss(s, t, mask, loss=name, temperature=temperature)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_topk_partial_finite_and_decreases_toward_teacher() -> None:
    s0, t, mask = _logits(0), _logits(1, scale=3.0), _mask()
    lp, idx = _topk_cache(t, 4)
    values = []
    for a in (0.0, 0.5, 0.9, 1.0):
        loss = topk_response_loss((1 - a) * s0 + a * t, lp, idx, mask, temperature=2.0)
        assert torch.isfinite(loss)
        values.append(loss.item())
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    # exact value against a hand computation (T = 2)
    q = F.log_softmax(lp / 2.0, -1)
    ls = F.log_softmax(s0 / 2.0, -1).gather(-1, idx)
    ref = 4.0 * _masked_mean((q.exp() * (q - ls)).sum(-1), mask)
    assert values[0] == pytest.approx(ref.item(), rel=1e-5)


def test_topk_masked_garbage_and_errors() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    lp, idx = _topk_cache(t, 3)
    clean = topk_response_loss(s, lp, idx, mask)
    lp_bad, idx_bad = lp.clone(), idx.clone()
    lp_bad[~mask] = float("nan")
    idx_bad[~mask] = -1
    assert topk_response_loss(s, lp_bad, idx_bad, mask).item() == pytest.approx(clean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="only .*forward_kl.*soft_ce.*top-k|top-k.*only.*forward_kl"):
        topk_response_loss(s, lp, idx, mask, loss="reverse_kl")
    idx_oob = idx.clone()
    idx_oob[0, 0, 0] = V
    with pytest.raises(ValueError, match="student vocab size"):
        topk_response_loss(s, lp, idx_oob, mask)
    with pytest.raises(ValueError, match="same shape"):
        topk_response_loss(s, lp[..., :2], idx, mask)


# ----------------------------------------------------------------------------- feature-based


def test_hidden_state_loss_exact() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])
    assert hidden_state_loss(s, t, kind="mse").item() == pytest.approx((0.5 + 8.0) / 2)
    cos_loss = ((1 - 1 / math.sqrt(2)) + 2.0) / 2
    assert hidden_state_loss(s, t, kind="cosine").item() == pytest.approx(cos_loss, rel=1e-6)
    only_first = torch.tensor([[True, False]])
    assert hidden_state_loss(s, t, only_first, kind="mse").item() == pytest.approx(0.5)
    assert hidden_state_loss(s, t, kind="mse", num_items_in_batch=4).item() == pytest.approx(8.5 / 4)
    with pytest.raises(ValueError, match="same shape"):
        hidden_state_loss(s, t[..., :1])
    with pytest.raises(ValueError, match="mse"):
        hidden_state_loss(s, t, kind="l1")


def test_attention_map_loss() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(2, 4, 6, 6, generator=g), -1)
    t = torch.softmax(torch.randn(2, 8, 6, 6, generator=g), -1)
    assert attention_map_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    loss = attention_map_loss(s, t)
    assert loss.item() > 0
    sm, tm = s.mean(1), t.mean(1)
    ref = (tm * (tm.clamp(min=1e-8).log() - sm.clamp(min=1e-8).log())).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    t_bad = t.clone()
    t_bad[1, :, 3:] = float("nan")
    ref = (tm * (tm.clamp(min=1e-8).log() - sm.clamp(min=1e-8).log())).sum(-1)[mask].mean()
    assert attention_map_loss(s, t_bad, mask).item() == pytest.approx(ref.item(), rel=1e-5)


def test_uniform_layer_map() -> None:
    assert uniform_layer_map(10, 30) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert uniform_layer_map(3, 30) == [10, 20, 30]
    assert uniform_layer_map(4, 30) == [8, 15, 23, 30]  # 7.5 and 22.5 round half up
    assert uniform_layer_map(5, 5) == [1, 2, 3, 4, 5]
    for ls in range(1, 13):
        m = uniform_layer_map(ls, 12)
        assert m[-1] == 12 and all(a < b for a, b in itertools.pairwise(m))
    with pytest.raises(ValueError, match=">= 1"):
        uniform_layer_map(0, 4)
    with pytest.raises(ValueError, match="more layers"):
        uniform_layer_map(5, 4)


# ----------------------------------------------------------------------------- relation-based


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def test_pool_hidden() -> None:
    h = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, False], [False, False, True]])
    h_bad = h.clone()
    h_bad[0, 2] = float("nan")
    assert torch.allclose(pool_hidden(h_bad, mask), torch.tensor([[1.0, 2.0], [10.0, 11.0]]))
    assert torch.allclose(pool_hidden(h), h.mean(1))


def test_rkd_distance_invariances() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 8, generator=g)
    student = torch.randn(6, 5, generator=g)
    assert rkd_distance_loss(teacher * 7.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_distance_loss(teacher @ _orthogonal(8, 1), teacher).item() == pytest.approx(0.0, abs=1e-6)
    # wider student: orthonormal-row projection [8, 20] preserves distances
    proj = _orthogonal(20, 2)[:8]
    assert rkd_distance_loss(teacher @ proj, teacher).item() == pytest.approx(0.0, abs=1e-6)
    loss = rkd_distance_loss(student, teacher)
    assert loss.item() > 0
    assert rkd_distance_loss(student * 7.0, teacher).item() == pytest.approx(loss.item(), rel=1e-4)
    # exact value
    off = ~torch.eye(6, dtype=torch.bool)
    ds, dt = torch.cdist(student.double(), student.double()), torch.cdist(teacher.double(), teacher.double())
    ds, dt = ds / ds[off].mean(), dt / dt[off].mean()
    ref = F.smooth_l1_loss(ds[off], dt[off], beta=1.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        rkd_distance_loss(student[:1], teacher[:1])


def test_rkd_angle() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 8, generator=g)
    student = torch.randn(5, 3, generator=g)
    copy = teacher * 3.0 + torch.randn(8, generator=g)
    assert rkd_angle_loss(copy, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle_loss(teacher @ _orthogonal(20, 1)[:8], teacher).item() == pytest.approx(0.0, abs=1e-6)
    loss = rkd_angle_loss(student, teacher)
    assert loss.item() > 0

    def angles(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = torch.zeros(n, n, n, dtype=torch.float64)
        x = x.double()
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, c = x[i] - x[j], x[k] - x[j]
                    if a.norm() > 0 and c.norm() > 0:
                        out[i, j, k] = (a @ c) / (a.norm() * c.norm())
        return out

    ref = F.smooth_l1_loss(angles(student), angles(teacher), beta=1.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle_loss(student[:2], teacher[:2])
    with pytest.raises(ValueError, match="batch sizes differ"):
        rkd_angle_loss(student[:4], teacher)


def test_token_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 8, generator=g)
    assert token_similarity_loss(teacher * 4.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    wide = teacher @ _orthogonal(16, 1)[:8]
    assert token_similarity_loss(wide, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 3, generator=g)
    loss = token_similarity_loss(student, teacher)
    assert loss.item() > 0
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    sn, tn = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    sq = (sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)).pow(2)
    pairs = mask[:, :, None] & mask[:, None, :]
    student_bad = student.clone()
    student_bad[0, 3:] = float("inf")
    got = token_similarity_loss(student_bad, teacher, mask)
    assert got.item() == pytest.approx((sq[pairs].sum() / pairs.sum()).item(), rel=1e-5)
    assert set(RELATION_LOSSES) == {"rkd_distance", "rkd_angle", "token_similarity"}


# ----------------------------------------------------------------------------- mutual


def test_mutual_kl() -> None:
    s, mask = _logits(0), _logits(9)[..., 0] > 0
    p1, p2 = _logits(1).requires_grad_(True), _logits(2).requires_grad_(True)
    one = mutual_kl_loss(s, [p1], mask, temperature=2.0)
    assert one.item() == pytest.approx(
        response_loss(s, p1.detach(), mask, loss="forward_kl", temperature=2.0).item(), rel=1e-6
    )
    two = mutual_kl_loss(s, [p1, p2], mask)
    ref = (response_loss(s, p1.detach(), mask) + response_loss(s, p2.detach(), mask)) / 2
    assert two.item() == pytest.approx(ref.item(), rel=1e-6)
    s = s.requires_grad_(True)
    mutual_kl_loss(s, [p1, p2], mask).backward()
    assert s.grad is not None and p1.grad is None and p2.grad is None
    with pytest.raises(ValueError, match="at least one peer"):
        mutual_kl_loss(s, [], mask)


# ----------------------------------------------------------------------------- gradients


def _grad_cases():
    mask = _mask()
    lp, idx = _topk_cache(_logits(1), 4)
    cases = {f"response_{n}": (lambda s, t, n=n: response_loss(s, t, mask, loss=n, beta=0.3)) for n in RESPONSE_LOSSES}
    cases["topk"] = lambda s, t: topk_response_loss(s, lp, idx, mask, loss="soft_ce")
    cases["mutual"] = lambda s, t: mutual_kl_loss(s, [t], mask)
    cases["hidden_mse"] = lambda s, t: hidden_state_loss(s, t, mask, kind="mse")
    cases["hidden_cos"] = lambda s, t: hidden_state_loss(s, t, mask, kind="cosine")
    cases["attention"] = lambda s, t: attention_map_loss(
        torch.softmax(s[:, None, :, :T], -1), torch.softmax(t[:, None, :, :T], -1), mask
    )
    cases["rkd_distance"] = lambda s, t: rkd_distance_loss(pool_hidden(s, mask), pool_hidden(t[..., :4], mask))
    cases["rkd_angle"] = lambda s, t: rkd_angle_loss(pool_hidden(s, mask), pool_hidden(t, mask))
    cases["token_similarity"] = lambda s, t: token_similarity_loss(s, t[..., :6], mask)
    return cases


@pytest.mark.parametrize("name", list(_grad_cases()))
def test_gradients_flow_to_student_only(name: str) -> None:
    fn = _grad_cases()[name]
    s = _logits(0).requires_grad_(True)
    t = _logits(1)
    loss = fn(s, t)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_teacher_minus_inf_at_valid_position_is_handled() -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    t[0, 0, :3] = float("-inf")  # e.g. a teacher that hard-masks some tokens
    s.requires_grad_(True)
    for name in ("forward_kl", "soft_ce", "jsd"):
        loss = response_loss(s, t, mask, loss=name)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()
    assert response_loss(s, t, mask, loss="reverse_kl").item() == float("inf")
