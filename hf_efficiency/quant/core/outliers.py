"""Outlier keeping (SpQR-style): the most sensitive weights of every row stay in float16.

The kept weights are stored beside the low-bit codes in the ELL sparse layout: a fixed number
``k`` of (column, value) pairs per row, so every checkpoint tensor has a shape known from the
config alone. They are excluded from the group ranges, which is where most of the gain comes
from: one large weight no longer stretches the scale of its whole group.
"""

from __future__ import annotations

import torch

from .scheme import QuantizedWeight


def outlier_index_dtype(in_features: int) -> torch.dtype:
    """Storage dtype of kept-outlier column numbers: int16 while ``in_features`` fits, else int32."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def outlier_scores(weight: torch.Tensor, act_rms: torch.Tensor | None = None) -> torch.Tensor:
    """Sensitivity of each weight: ``|w_ij| * rms(x_j)`` (its typical contribution to the output)
    with calibration statistics, ``|w_ij|`` without."""
    score = weight.detach().float().abs()
    if act_rms is not None:
        score = score * act_rms.to(score.device).float().reshape(1, -1)
    return score


def select_outliers(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring columns of every row: (bool mask ``[out, in]``, sorted column
    indices ``[out, k]`` as int64)."""
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"outliers per row must be in [1, {scores.shape[1]}], got {k}")
    index = scores.topk(k, dim=1).indices.sort(dim=1).values
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)
    return mask, index


def attach_outliers(q: QuantizedWeight, index: torch.Tensor, values: torch.Tensor) -> QuantizedWeight:
    """``q`` with the kept weights: ``values [out, in]`` read at ``index [out, k]``."""
    q.outlier_index = index.to(outlier_index_dtype(q.in_features))
    q.outlier_value = values.float().gather(1, index.long()).to(torch.float16)
    return q
