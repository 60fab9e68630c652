"""Distillation losses as small, pure tensor functions.

Conventions shared by every function here:

* Logits are ``[B, T, V]``. A token ``mask`` is a bool ``[B, T]`` over *logit positions*:
  position ``t`` counts iff it predicts a real label (see :func:`token_mask`).
* Everything is computed in float32 (bf16/fp16 inputs are cast up) and every loss returns a
  0-dim float32 tensor, differentiable w.r.t. the student inputs.
* Teacher inputs are used as given (the caller detaches them); only :func:`mutual_kl_loss`
  detaches its peers itself, because peers are usually models that are being trained too.
* Masked-out positions are replaced by zeros *before* any math (``torch.where``), so garbage
  (``inf``/``nan``) there influences neither the value nor the gradient.
* Token-level losses are reduced by :func:`reduce_tokens`: the sum over valid positions divided
  by ``num_items_in_batch`` when given (HF Trainer's count of valid tokens over all
  gradient-accumulation micro-batches), else by the number of valid positions in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HIDDEN_LOSSES",
    "RELATION_LOSSES",
    "RESPONSE_LOSSES",
    "TOPK_LOSSES",
    "attention_map_loss",
    "common_vocab",
    "hidden_state_loss",
    "mutual_kl_loss",
    "pool_hidden",
    "reduce_tokens",
    "response_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "token_mask",
    "token_similarity_loss",
    "topk_response_loss",
    "uniform_layer_map",
]

RESPONSE_LOSSES = ("forward_kl", "reverse_kl", "jsd", "soft_ce", "mse")
TOPK_LOSSES = ("forward_kl", "soft_ce")
HIDDEN_LOSSES = ("mse", "cosine")
RELATION_LOSSES = ("rkd_distance", "rkd_angle", "token_similarity")

IGNORE_INDEX = -100
_PROB_EPS = 1e-8
_DIST_EPS = 1e-12


# ----------------------------------------------------------------------------- helpers


def token_mask(labels: Tensor) -> Tensor:
    """Bool ``[B, T]``: logit position ``t`` is valid iff ``labels[:, t + 1] != -100`` (HF causal shift)."""
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def reduce_tokens(per_token: Tensor, mask: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Sum ``per_token`` over valid positions, divided by ``num_items_in_batch`` or the valid count."""
    mask = mask.bool()
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    per_token = per_token.float()
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / _token_count(mask, num_items_in_batch, total)


def _token_count(mask: Tensor, num_items_in_batch: int | Tensor | None, like: Tensor) -> Tensor:
    """The divisor of a token-level loss: ``num_items_in_batch`` if given, else the valid positions here."""
    if num_items_in_batch is None:
        return mask.sum().clamp(min=1).to(like.dtype)
    return torch.as_tensor(num_items_in_batch, dtype=like.dtype, device=like.device)


def common_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Slice both logits to the shared vocabulary ``V = min(Vs, Vt)`` (drops padded columns)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def _check_mask(mask: Tensor, x: Tensor, name: str) -> Tensor:
    mask = mask.bool()
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(x.shape)}")
    return mask


def _masked_f32(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` in float32 with every masked-out ``[b, t]`` row replaced by zeros."""
    x = x.float()
    keep = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _all_tokens(x: Tensor) -> Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dim from log-probs; terms with ``p == 0`` count as 0."""
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def _cross_entropy(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``-sum p log q`` over the last dim from log-probs; terms with ``p == 0`` count as 0."""
    p = log_p.exp()
    terms = p * log_q
    return -torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _jsd(log_ps: Tensor, log_pt: Tensor, beta: float) -> Tensor:
    """Generalized JSD: ``beta * KL(pt || M) + (1 - beta) * KL(ps || M)``, ``M = beta pt + (1-beta) ps``."""
    if beta == 0.0:
        return _kl(log_pt, log_ps)
    if beta == 1.0:
        return _kl(log_ps, log_pt)
    log_m = torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)


# ----------------------------------------------------------------------------- response-based


_ROW_CHUNK = 256


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Per-row ``KL(p_t || p_s)`` (or soft cross entropy) over ``[N, V]`` logit rows, in row chunks.

    Nothing ``[N, V]``-sized is kept for backward beyond the inputs: the gradient
    ``(softmax(s / T) - softmax(t / T)) / T`` is recomputed chunk by chunk. Both losses share it.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, temperature: float, with_entropy: bool) -> Tensor:
        out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], _ROW_CHUNK):
            sc, tc = s[i : i + _ROW_CHUNK].float(), t[i : i + _ROW_CHUNK].float()
            if temperature != 1.0:
                sc, tc = sc / temperature, tc / temperature
            log_ps = F.log_softmax(sc, dim=-1)
            log_pt = F.log_softmax(tc, dim=-1)
            pt = log_pt.exp()
            row = -(pt * log_ps.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
            if with_entropy:  # forward KL = soft CE - teacher entropy; p log p counts 0 where p == 0
                row = row + torch.where(pt > 0, pt * log_pt, torch.zeros_like(pt)).sum(-1)
            out[i : i + _ROW_CHUNK] = row
        ctx.save_for_backward(s, t)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        s, t = ctx.saved_tensors
        temp = ctx.temperature
        grad = torch.empty_like(s)
        for i in range(0, s.shape[0], _ROW_CHUNK):
            sc, tc = s[i : i + _ROW_CHUNK].float(), t[i : i + _ROW_CHUNK].float()
            if temp != 1.0:
                sc, tc = sc / temp, tc / temp
            g = F.softmax(sc, dim=-1).sub_(F.softmax(tc, dim=-1))
            grad[i : i + _ROW_CHUNK] = g.mul_(grad_rows[i : i + _ROW_CHUNK, None] / temp).to(s.dtype)
        return grad, None, None, None


def _soft_target_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float,
    with_entropy: bool,
    num_items_in_batch: int | Tensor | None,
) -> Tensor:
    """Forward KL / soft CE on the valid rows only, with the chunked, memory-light autograd function."""
    rows = _SoftTargetCrossEntropy.apply(student_logits[mask], teacher_logits[mask].detach(), temperature, with_entropy)
    total = (rows * temperature**2).sum()
    return total / _token_count(mask, num_items_in_batch, total)


def response_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Logit distillation loss between ``[B, T, V]`` student and teacher logits.

    ``loss`` is one of :data:`RESPONSE_LOSSES`:

    * ``forward_kl``: ``KL(p_teacher || p_student)``; ``reverse_kl``: ``KL(p_student || p_teacher)``.
    * ``soft_ce``: ``-sum p_teacher log p_student`` (= forward_kl + teacher entropy).
    * ``jsd``: generalized Jensen-Shannon ``beta KL(pt || M) + (1 - beta) KL(ps || M)`` with
      ``M = beta pt + (1 - beta) ps``. Following the GKD/TRL convention ``beta == 0`` returns exactly
      forward_kl and ``beta == 1`` exactly reverse_kl (not the limits, which are 0); ``beta = 0.5`` is
      the symmetric JSD.
    * ``mse``: mean over the vocab of the squared raw-logit difference (no temperature).

    Distribution losses use ``logits / temperature`` and are scaled by ``temperature ** 2``.
    """
    if loss not in RESPONSE_LOSSES:
        raise ValueError(f"unknown response loss {loss!r}; expected one of {RESPONSE_LOSSES}")
    _check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    student_logits, teacher_logits = common_vocab(student_logits, teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ beyond the vocab dim"
        )
    mask = _check_mask(mask, student_logits, "logits")
    if loss == "jsd" and beta in (0.0, 1.0):
        loss = "forward_kl" if beta == 0.0 else "reverse_kl"
    if loss in ("forward_kl", "soft_ce"):
        return _soft_target_loss(
            student_logits, teacher_logits, mask, temperature, loss == "forward_kl", num_items_in_batch
        )
    s = _masked_f32(student_logits, mask)
    t = _masked_f32(teacher_logits, mask)
    if loss == "mse":
        return reduce_tokens((s - t).pow(2).mean(-1), mask, num_items_in_batch)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    if loss == "forward_kl":
        per_token = _kl(log_pt, log_ps)
    elif loss == "reverse_kl":
        per_token = _kl(log_ps, log_pt)
    elif loss == "soft_ce":
        per_token = _cross_entropy(log_pt, log_ps)
    else:
        per_token = _jsd(log_ps, log_pt, beta)
    return reduce_tokens(per_token * temperature**2, mask, num_items_in_batch)


def topk_response_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    mask: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Distill from a cached top-k teacher: ``[B, T, K]`` log-probs (at T=1) and their vocab indices.

    The teacher is renormalized over its K tokens after tempering (``q_k ∝ exp(logprob_k / T)``);
    the student uses its full-vocab ``log_softmax(logits / T)`` gathered at the indices.
    ``forward_kl = sum_k q_k (log q_k - log p_k)``, ``soft_ce = -sum_k q_k log p_k``, both × T².
    Indices at masked positions are ignored (may be padding such as -1).
    """
    if loss not in TOPK_LOSSES:
        raise ValueError(f"loss {loss!r} is not possible from a top-k teacher cache; only {TOPK_LOSSES} are supported")
    _check_temperature(temperature)
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"teacher top-k log-probs {tuple(teacher_topk_logprobs.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)} must have the same shape"
        )
    if tuple(teacher_topk_indices.shape[:2]) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"teacher top-k shape {tuple(teacher_topk_indices.shape)} does not match student logits "
            f"{tuple(student_logits.shape)} in [B, T]"
        )
    mask = _check_mask(mask, student_logits, "logits")
    vocab = student_logits.shape[-1]
    keep = mask.unsqueeze(-1)
    idx = torch.where(keep, teacher_topk_indices.long(), torch.zeros((), dtype=torch.long, device=mask.device))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
        raise ValueError(
            f"teacher top-k indices must lie in [0, {vocab}) (the student vocab size); "
            f"got range [{int(idx.min())}, {int(idx.max())}]"
        )
    log_ps = F.log_softmax(_masked_f32(student_logits, mask) / temperature, dim=-1).gather(-1, idx)
    log_q = F.log_softmax(_masked_f32(teacher_topk_logprobs, mask) / temperature, dim=-1)
    if loss == "forward_kl":
        per_token = _kl(log_q, log_ps)
    else:
        per_token = _cross_entropy(log_q, log_ps)
    return reduce_tokens(per_token * temperature**2, mask, num_items_in_batch)


# ----------------------------------------------------------------------------- feature-based


def hidden_state_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
    *,
    kind: str = "mse",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Per-token ``mse`` (mean over D) or ``cosine`` (1 - cos sim) between ``[B, T, D]`` hidden states.

    The student must already be projected to the teacher width. ``mask`` is over tokens (e.g.
    ``attention_mask.bool()``), None = all tokens; reduced as the mean over valid tokens unless
    ``num_items_in_batch`` is given.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"unknown hidden-state loss {kind!r}; expected one of {HIDDEN_LOSSES}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} must have the same shape (project the student first)"
        )
    mask = _all_tokens(student_hidden) if mask is None else _check_mask(mask, student_hidden, "hidden")
    s = _masked_f32(student_hidden, mask)
    t = _masked_f32(teacher_hidden, mask)
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    else:
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=_PROB_EPS)
    return reduce_tokens(per_token, mask, num_items_in_batch)


def attention_map_loss(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over valid query rows of ``KL(teacher_row || student_row)`` of head-averaged attention.

    Inputs are attention probabilities ``[B, H, T, T]`` (head counts may differ); probabilities
    are clamped at 1e-8 before the log. ``mask`` is ``[B, T]`` over query tokens, None = all.
    """
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError("attention maps must be [B, H, T, T]")
    if student_attn.shape[0] != teacher_attn.shape[0] or student_attn.shape[2:] != teacher_attn.shape[2:]:
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention "
            f"{tuple(teacher_attn.shape)} differ beyond the head dim"
        )
    s = student_attn.float().mean(1)
    t = teacher_attn.float().mean(1)
    mask = _all_tokens(s) if mask is None else _check_mask(mask, s, "attention")
    s = _masked_f32(s, mask)
    t = _masked_f32(t, mask)
    per_row = (t * (t.clamp(min=_PROB_EPS).log() - s.clamp(min=_PROB_EPS).log())).sum(-1)
    return reduce_tokens(per_row, mask)


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher ``hidden_states`` index for each student layer ``i = 1..Ls``: ``round(i * Lt / Ls)``.

    Index 0 is the embedding output, index i the output of decoder layer i. Halves round up
    (not Python's banker's rounding), so e.g. ``(4, 30) -> [8, 15, 23, 30]``.
    """
    ls, lt = int(num_student_layers), int(num_teacher_layers)
    if ls < 1 or lt < 1:
        raise ValueError(f"layer counts must be >= 1, got student={ls}, teacher={lt}")
    if ls > lt:
        raise ValueError(f"student has more layers ({ls}) than the teacher ({lt}); cannot map uniformly")
    return [(2 * i * lt + ls) // (2 * ls) for i in range(1, ls + 1)]


# ----------------------------------------------------------------------------- relation-based


def pool_hidden(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked mean over tokens: ``[B, T, D] -> [B, D]`` (float32); None = all tokens."""
    mask = _all_tokens(hidden) if mask is None else _check_mask(mask, hidden, "hidden")
    x = _masked_f32(hidden, mask)
    count = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    return x.sum(1) / count


def _check_batch(student: Tensor, teacher: Tensor, min_batch: int, name: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{name} expects [B, D] inputs, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: batch sizes differ ({student.shape[0]} vs {teacher.shape[0]})")
    if student.shape[0] < min_batch:
        raise ValueError(f"{name} needs a batch of at least {min_batch}, got {student.shape[0]}")


def _pairwise_diff(x: Tensor) -> Tensor:
    """``[B, D] -> [B, B, D]`` with ``out[i, j] = x_i - x_j``."""
    return x.unsqueeze(1) - x.unsqueeze(0)


def _normalized_distances(x: Tensor, off_diag: Tensor) -> Tensor:
    sq = _pairwise_diff(x).pow(2).sum(-1)
    dist = torch.where(off_diag, sq, torch.ones_like(sq)).sqrt()  # avoid sqrt'(0) on the diagonal
    dist = torch.where(off_diag, dist, torch.zeros_like(dist))
    return dist / dist[off_diag].mean().clamp(min=_DIST_EPS)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss: smooth L1 between mean-normalized pairwise distance matrices ``[B, B]``.

    Inputs are ``[B, Ds]`` and ``[B, Dt]`` (widths may differ); needs ``B >= 2``. Cost O(B² D).
    """
    _check_batch(student, teacher, 2, "rkd_distance_loss")
    b = student.shape[0]
    off_diag = ~torch.eye(b, dtype=torch.bool, device=student.device)
    ds = _normalized_distances(student.float(), off_diag)
    dt = _normalized_distances(teacher.float(), off_diag)
    return F.smooth_l1_loss(ds[off_diag], dt[off_diag], beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """``[B, D] -> [B, B, B]``: ``out[i, j, k] = e_ij · e_kj`` with ``e_ij = normalize(x_i - x_j)``."""
    e = F.normalize(_pairwise_diff(x), p=2, dim=-1, eps=_DIST_EPS)  # [i, j, D]
    e = e.transpose(0, 1)  # [j, i, D]
    return torch.bmm(e, e.transpose(1, 2)).permute(1, 0, 2)  # [j, i, k] -> [i, j, k]


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss: smooth L1 between the ``[B, B, B]`` triplet-angle cosines; needs ``B >= 3``.

    Cost O(B³ + B² D).
    """
    _check_batch(student, teacher, 3, "rkd_angle_loss")
    return F.smooth_l1_loss(_angles(student.float()), _angles(teacher.float()), beta=1.0)


def token_similarity_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between per-sequence token-by-token cosine-similarity matrices ``[B, T, T]``.

    Widths may differ; only pairs where both tokens are valid count (``mask`` ``[B, T]``, None = all).
    """
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise ValueError("token_similarity_loss expects [B, T, D] inputs")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} differ in [B, T]"
        )
    mask = _all_tokens(student_hidden) if mask is None else _check_mask(mask, student_hidden, "hidden")
    pairs = mask.unsqueeze(2) & mask.unsqueeze(1)

    def sim(h: Tensor) -> Tensor:
        h = F.normalize(_masked_f32(h, mask), p=2, dim=-1, eps=_PROB_EPS)
        return h @ h.transpose(1, 2)

    sq = (sim(student_hidden) - sim(teacher_hidden)).pow(2)
    total = torch.where(pairs, sq, torch.zeros_like(sq)).sum()
    return total / pairs.sum().clamp(min=1).to(total.dtype)


# ----------------------------------------------------------------------------- online / mutual


def mutual_kl_loss(
    student_logits: Tensor,
    peer_logits_list: Sequence[Tensor],
    mask: Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Deep-mutual-learning loss: mean over peers of ``KL(p_peer || p_student)`` × T².

    Peers are detached here (they are usually being trained too); same token reduction as
    :func:`response_loss`.
    """
    if len(peer_logits_list) == 0:
        raise ValueError("mutual_kl_loss needs at least one peer")
    losses = [
        response_loss(
            student_logits,
            peer.detach(),
            mask,
            loss="forward_kl",
            temperature=temperature,
            num_items_in_batch=num_items_in_batch,
        )
        for peer in peer_logits_list
    ]
    return torch.stack(losses).mean()
