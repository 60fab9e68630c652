"""GGUF (ggml) quantized blocks -> our group-wise codes, scales and minima (pure tensor functions).

Every ggml block format used for LLM weights is an integer code per weight times a scale per
sub-block, plus an optional minimum, so each maps onto our scheme (`..quant.scheme`) exactly:

=======  =========  ===============================================  ===============================
type     bits/group  ggml's weight                                   ours (exact)
=======  =========  ===============================================  ===============================
Q8_0     8 / 32     ``d * q``, q int8                                symmetric, u = q + 128
Q4_0     4 / 32     ``d * (q - 8)``                                  symmetric
Q4_1     4 / 32     ``d * q + m``                                    asymmetric, min = m
Q5_0     5 / 32     ``d * (q - 16)``                                 symmetric
Q5_1     5 / 32     ``d * q + m``                                    asymmetric
Q2_K     2 / 16     ``d*sc_j * q - dmin*m_j`` (4-bit sc, m)          asymmetric, float32 scale/min
Q3_K     3 / 16     ``d*(sc_j - 32) * (q - 4)`` (6-bit sc)           symmetric, float32 scale
Q4_K     4 / 32     ``d*sc_j * q - dmin*m_j`` (6-bit sc, m)          asymmetric, float32 scale/min
Q5_K     5 / 32     as Q4_K with 5-bit q                             asymmetric, float32 scale/min
Q6_K     6 / 16     ``d*sc_j * (q - 32)`` (int8 sc)                  symmetric, float32 scale
=======  =========  ===============================================  ===============================

The legacy types keep their float16 ``d`` and ``m`` as our float16 scales and minima: same bits per
weight as the file (Q4_1: 5.0). The K-quants' two-level scales (a float16 super-block scale times a
small integer per sub-block) are products that need float32 to be exact: the weights are the same,
and the scale overhead grows (Q4_K 4.5 -> 6.0 bits per weight). ``scale_dtype="float16"`` rounds
those products instead (nearest; the error is measured by the loader).

Each decoder takes the raw bytes of one tensor ``uint8 [rows, blocks_per_row * block_bytes]`` and
returns ``codes uint8 [rows, n]``, ``scale [rows, G]`` and ``minimum [rows, G]`` or ``None``, computed
so that ``codes * scale + minimum`` (or ``(codes - 2**(bits-1)) * scale``) in float32 is what ggml's
own dequantization computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class BlockFormat:
    """How one ggml type maps onto our scheme."""

    name: str
    block_elems: int
    block_bytes: int
    bits: int
    group_size: int
    symmetric: bool
    exact_scale_dtype: torch.dtype  # the smallest dtype holding ggml's scales exactly
    decode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """Float16 at byte ``offset`` of every block ``[N, bytes]`` -> float32 ``[N, 1]``."""
    return b[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return qs & 0xF, qs >> 4


def _bits_of(x: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """``(x[..., None, :] >> shifts[:, None]) & mask`` for uint8 ``x``: one plane per shift."""
    return (x.unsqueeze(-2) >> shifts.view(-1, 1).to(torch.uint8)) & mask


def _q8_0(b):
    d = _f16(b, 0)
    codes = (b[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return codes, d, None


def _q4_0(b):
    lo, hi = _nibbles(b[:, 2:18])
    return torch.cat([lo, hi], 1), _f16(b, 0), None


def _q4_1(b):
    lo, hi = _nibbles(b[:, 4:20])
    return torch.cat([lo, hi], 1), _f16(b, 0), _f16(b, 2)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """Bit ``j`` of the little-endian uint32 ``qh`` (4 bytes per block) for ``j = 0..31``."""
    planes = _bits_of(qh, torch.arange(8), 1)  # [N, 8 bits, 4 bytes]
    return planes.transpose(1, 2).reshape(qh.shape[0], 32)  # byte-major: bit j = byte j//8, bit j%8


def _q5_0(b):
    lo, hi = _nibbles(b[:, 6:22])
    return torch.cat([lo, hi], 1) | (_high_bits_32(b[:, 2:6]) << 4), _f16(b, 0), None


def _q5_1(b):
    lo, hi = _nibbles(b[:, 8:24])
    return torch.cat([lo, hi], 1) | (_high_bits_32(b[:, 4:8]) << 4), _f16(b, 0), _f16(b, 2)


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: 64 bytes -> 256 codes ordered (half, shift, byte-in-half)."""
    n = qs.shape[0]
    return _bits_of(qs.reshape(n, 2, 32), torch.tensor([0, 2, 4, 6]), 3).reshape(n, QK_K)


def _q2_k(b):
    sc = b[:, 0:16]
    codes = _two_bit_planes(b[:, 16:80])
    d, dmin = _f16(b, 80), _f16(b, 82)
    scale = d * (sc & 0xF).float()
    minimum = -(dmin * (sc >> 4).float())
    return codes, scale, minimum


def _q3_k_scales(sc: torch.Tensor) -> torch.Tensor:
    """The 16 six-bit scales of a Q3_K block from its 12 bytes (minus 32: signed)."""
    low, high = sc[:, 0:8], sc[:, 8:12]
    s = torch.cat(
        [
            (low[:, 0:4] & 0xF) | ((high & 3) << 4),
            (low[:, 4:8] & 0xF) | (((high >> 2) & 3) << 4),
            (low[:, 0:4] >> 4) | (((high >> 4) & 3) << 4),
            (low[:, 4:8] >> 4) | (((high >> 6) & 3) << 4),
        ],
        1,
    )
    return s.float() - 32


def _q3_k(b):
    n = b.shape[0]
    low = _two_bit_planes(b[:, 32:96])
    hbit = _bits_of(b[:, 0:32], torch.arange(8), 1).reshape(n, QK_K)  # bit (half*4 + shift/2) of byte l
    codes = low | (hbit << 2)
    return codes, _f16(b, 108) * _q3_k_scales(b[:, 96:108]), None


def _k4_scales_mins(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``get_scale_min_k4`` for j = 0..7 from the 12 scale bytes of a Q4_K/Q5_K block."""
    q = sc.to(torch.int32)
    scales = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return scales.float(), mins.float()


def _k4_low(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low nibbles: 128 bytes -> 256 codes ordered (chunk of 32 bytes, nibble, byte)."""
    n = qs.shape[0]
    lo, hi = _nibbles(qs.reshape(n, 4, 32))
    return torch.stack([lo, hi], 2).reshape(n, QK_K)


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k4_scales_mins(b[:, 4:16])
    return _k4_low(b[:, 16:144]), d * sc, -(dmin * m)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k4_scales_mins(b[:, 4:16])
    high = _bits_of(b[:, 16:48], torch.arange(8), 1).reshape(n, QK_K)  # bit (2*chunk + nibble) of byte l
    return _k4_low(b[:, 48:176]) | (high << 4), d * sc, -(dmin * m)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # half, (l vs l+32), l
    qh = b[:, 128:192].reshape(n, 2, 32)  # half, l
    lo, hi = _nibbles(ql)
    low = torch.stack([lo[:, :, 0], lo[:, :, 1], hi[:, :, 0], hi[:, :, 1]], 2)  # half, k, l
    high = _bits_of(qh, torch.tensor([0, 2, 4, 6]), 3)  # half, k, l
    codes = (low | (high << 4)).reshape(n, QK_K)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return codes, _f16(b, 208) * sc, None


BLOCK_FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("Q8_0", 32, 34, 8, 32, True, torch.float16, _q8_0),
        BlockFormat("Q4_0", 32, 18, 4, 32, True, torch.float16, _q4_0),
        BlockFormat("Q4_1", 32, 20, 4, 32, False, torch.float16, _q4_1),
        BlockFormat("Q5_0", 32, 22, 5, 32, True, torch.float16, _q5_0),
        BlockFormat("Q5_1", 32, 24, 5, 32, False, torch.float16, _q5_1),
        BlockFormat("Q2_K", QK_K, 84, 2, 16, False, torch.float32, _q2_k),
        BlockFormat("Q3_K", QK_K, 110, 3, 16, True, torch.float32, _q3_k),
        BlockFormat("Q4_K", QK_K, 144, 4, 32, False, torch.float32, _q4_k),
        BlockFormat("Q5_K", QK_K, 176, 5, 32, False, torch.float32, _q5_k),
        BlockFormat("Q6_K", QK_K, 210, 6, 16, True, torch.float32, _q6_k),
    )
}


def decode_blocks(
    raw: torch.Tensor, fmt: BlockFormat, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ``uint8 [rows, n]``, float32 scale and minimum ``[rows, n / group]`` of one tensor whose
    rows hold ``n`` weights as ``raw uint8 [rows, n / block_elems * block_bytes]``."""
    rows = raw.shape[0]
    if n % fmt.block_elems:
        raise ValueError(f"{fmt.name} rows hold whole blocks of {fmt.block_elems} weights; got a row of {n}")
    blocks = n // fmt.block_elems
    if raw.dtype != torch.uint8 or raw.shape[1] != blocks * fmt.block_bytes:
        raise ValueError(
            f"{fmt.name} data for rows of {n} weights must be uint8 [rows, {blocks * fmt.block_bytes}]; "
            f"got {raw.dtype} {list(raw.shape)}"
        )
    codes, scale, minimum = fmt.decode(raw.reshape(rows * blocks, fmt.block_bytes))
    groups = n // fmt.group_size
    codes = codes.reshape(rows, n)
    scale = scale.reshape(rows, groups)
    minimum = None if minimum is None else minimum.reshape(rows, groups)
    return codes, scale, minimum
