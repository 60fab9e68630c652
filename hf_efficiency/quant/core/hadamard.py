"""Hadamard rotations: orthonormal matrices that spread outliers evenly over all channels (QuaRot, QuIP#).

``hadamard_matrix(n)`` is a Hadamard matrix of order ``n = 2**k * m`` with ``m`` in 1, 12 or 20 (and
products of those: 576 = 12 * 12 * 4, 1536 = 12 * 128, 640 = 20 * 32), built as the Kronecker product of
Paley matrices of order 12 and 20 with a Sylvester matrix of order ``2**k``, scaled to be orthonormal.
A *random* Hadamard rotation ``R = diag(s) H^T`` multiplies each channel by a random sign ``s`` first
(QuaRot): any such ``R`` is orthogonal, so ``x W^T == (x R) (W R)^T`` and the rotation folds into a
weight (`rotate_input_columns`) or runs on the activations (`hadamard_transform`: a fast Walsh-Hadamard
transform in Kronecker-factored form: one small matrix product per factor of ``H``).
Pure tensor code.
"""

from __future__ import annotations

import functools
import math

import torch

#: orders of the non-power-of-two Hadamard factors we build (Paley construction I, q = 11 and 19)
PALEY_ORDERS = (12, 20)


@functools.lru_cache(maxsize=None)
def _paley(order: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    q = order - 1
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    h = torch.empty(order, order, dtype=torch.float64)
    h[0, :] = 1.0
    h[0, 0] = 0.0
    h[1:, 0] = -1.0
    for i in range(q):
        for j in range(q):
            h[1 + i, 1 + j] = chi[(j - i) % q]
    return h + torch.eye(order, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(n: int) -> tuple[tuple[int, ...], int]:
    """``(Paley orders, power of two)`` whose product is ``n``; ``ValueError`` when there are none."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard size must be a positive integer, got {n!r}")
    rest, factors = n, []
    while rest & (rest - 1):
        for order in PALEY_ORDERS:
            if rest % order == 0:
                factors.append(order)
                rest //= order
                break
        else:
            raise ValueError(
                f"no Hadamard matrix of order {n} is built here: the size must be 2**k times a product of "
                f"{', '.join(map(str, PALEY_ORDERS))} (e.g. 576, 640, 1536, 2048, 4096)"
            )
    return tuple(factors), rest


def has_hadamard(n: int) -> bool:
    """Whether `hadamard_matrix` can build order ``n``."""
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``H / sqrt(n)`` of order ``n`` (float64; ``H @ H.T == I``)."""
    factors, power = hadamard_factors(n)
    h = _sylvester(power)
    for order in factors:
        h = torch.kron(_paley(order), h)
    return h / math.sqrt(n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` signs ``+-1`` (int8) drawn from ``seed`` (the ``D`` of a random Hadamard rotation)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)


def rotation_matrix(n: int, signs: torch.Tensor) -> torch.Tensor:
    """``R = diag(signs) H^T`` (float64, orthogonal): ``x @ R`` is what `hadamard_transform` computes."""
    return signs.to(torch.float64)[:, None] * hadamard_matrix(n).T


def rotate_input_columns(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``W R`` for a weight ``[out, in]`` whose inputs are rotated by ``R = diag(signs) H^T``: then
    ``hadamard_transform(x, signs) @ (W R)^T == x @ W^T``. Computed in float64, returned in ``weight``'s dtype."""
    r = rotation_matrix(weight.shape[1], signs.cpu()).to(weight.device)
    return (weight.double() @ r).to(weight.dtype)


def rotate_output_rows(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``R^T W`` for a weight ``[out, in]`` whose outputs are rotated (``y -> y R``)."""
    return (rotation.to(weight.device).T @ weight.double()).to(weight.dtype)


#: largest Sylvester block applied as one matrix product by `hadamard_transform`
MAX_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _transform_factors(n: int) -> tuple[torch.Tensor, ...]:
    """Unnormalized Kronecker factors (float64) of the order-``n`` Hadamard matrix, outermost first: the
    Paley factors, then Sylvester blocks of at most `MAX_BLOCK` (``H_(2^(a+b)) = H_(2^a) kron H_(2^b)``)."""
    factors, power = hadamard_factors(n)
    mats = [_paley(order) for order in reversed(factors)]
    while power > 1:
        block = min(power, MAX_BLOCK)
        mats.append(_sylvester(block))
        power //= block
    return tuple(mats)


@functools.lru_cache(maxsize=64)
def _factors_as(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(m.T.to(device=device, dtype=dtype).contiguous() for m in _transform_factors(n))


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x @ diag(signs) @ H^T`` over the last dimension (``H`` orthonormal, `hadamard_matrix`), computed fast:
    the last dimension is viewed as one axis per Kronecker factor of ``H`` (Paley 12/20 blocks, Sylvester
    blocks of up to `MAX_BLOCK`) and each factor is one matrix product along its axis, ``O(n * sum of factor
    sizes)`` operations instead of ``O(n**2)`` (1536 = 12 x 128: 140 multiply-adds per element)."""
    n = x.shape[-1]
    mats = _factors_as(n, x.dtype, x.device)
    lead = x.shape[:-1]
    y = (x * signs.to(x.dtype)).reshape(-1, *(m.shape[0] for m in mats))
    for axis, mt in enumerate(mats, start=1):
        if axis == len(mats):
            y = y @ mt
        else:
            y = torch.movedim(torch.movedim(y, axis, -1) @ mt, -1, axis)
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, n)


__all__ = [
    "has_hadamard",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_transform",
    "random_signs",
    "rotate_input_columns",
    "rotate_output_rows",
    "rotation_matrix",
]
