"""Dense bit packing of unsigned integer codes into int32 words (pure tensor functions).

Each row of ``n`` codes of ``bits`` bits is a little-endian bit stream: code ``j`` occupies bits
``[bits*j, bits*(j+1))`` of the row, and word ``k`` holds stream bits ``[32k, 32k+32)``. Rows are
padded to a multiple of 32 codes, so a row of ``n`` codes takes ``ceil(n/32) * bits`` words:
exactly ``bits`` bits per weight for 2, 3, 4, 5, 6 and 8 bits (3-, 5- and 6-bit codes straddle word
boundaries).

Words are int32 so the packed tensor never has the float weight's shape: a checkpoint of ours
loaded by transformers without the plugin fails with a size mismatch instead of loading codes
as weights.
"""

from __future__ import annotations

import functools
import sys

import torch

from ...constants import QUANT_BITS, STORAGE_BITS

#: widths the quantization algorithms produce, ascending (5 and 6 bits, in STORAGE_BITS, hold
#: community formats such as GGUF's Q5_0/Q5_K/Q6_K exactly)
SUPPORTED_BITS = tuple(sorted(QUANT_BITS))


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words per row of ``n`` codes."""
    return -(-n // 32) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` in ``[0, 2**bits)`` into int32 words ``[..., packed_words(n)]``."""
    if bits not in STORAGE_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed values: {STORAGE_BITS}")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    padded = -(-n // 32) * 32
    if bits in (8, 4, 2) and sys.byteorder == "little":  # bytes of the stream, then a view (see unpack)
        c = codes.to(torch.uint8)
        if padded != n:
            c = torch.nn.functional.pad(c, (0, padded - n))
        per = 8 // bits
        c = c.reshape(*lead, padded // per, per)
        b = c[..., 0].clone()
        for k in range(1, per):
            b |= c[..., k] << (bits * k)
        return b.contiguous().view(torch.int32)  # [..., padded * bits / 32] words
    c = codes.to(torch.int64)
    if padded != n:
        c = torch.nn.functional.pad(c, (0, padded - n))
    c = c.reshape(*lead, padded // 32, 32)  # blocks of 32 codes -> `bits` words each
    shifts = torch.arange(bits, device=c.device, dtype=torch.int64)
    bitplanes = (c.unsqueeze(-1) >> shifts) & 1  # [..., blocks, 32 codes, bits]
    stream = bitplanes.reshape(*lead, padded // 32, bits, 32)  # [..., blocks, words, 32 bits]
    weights = torch.ones(32, dtype=torch.int64, device=c.device) << torch.arange(32, device=c.device)
    words = (stream * weights).sum(-1)  # unsigned 32-bit values in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(*lead, (padded // 32) * bits)


@functools.lru_cache(maxsize=None)
def _gather_plan(bits: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    j = torch.arange(32, dtype=torch.int64)
    start = bits * j
    lo = start // 32
    shift = start % 32
    straddles = shift + bits > 32
    hi = torch.where(straddles, lo + 1, lo)
    hi_shift = torch.where(straddles, 32 - shift, torch.full_like(shift, 63))
    dev = torch.device(device)
    return lo.to(dev), shift.to(dev), hi.to(dev), hi_shift.to(dev)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words ``[..., W]`` -> integer codes ``[..., n]`` (uint8 for
    up to 8 bits)."""
    if bits not in STORAGE_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed values: {STORAGE_BITS}")
    lead = words.shape[:-1]
    blocks = words.shape[-1] // bits
    mask = (1 << bits) - 1
    if bits in (8, 4) and sys.byteorder == "little":  # measured faster; 2-bit is faster word-wise
        # code j of a word sits at bits [bits*j, bits*(j+1)): on a little-endian machine byte k of the
        # word holds codes 8k/bits ... in its low-to-high bits, so split the bytes instead of the words
        b = words.contiguous().view(torch.uint8)  # [..., W * 4]
        if bits == 8:
            codes = b
        else:
            shifts = torch.arange(0, 8, bits, device=words.device, dtype=torch.uint8)
            codes = ((b.unsqueeze(-1) >> shifts) & mask).reshape(*lead, -1)
        return codes[..., :n]
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        codes = (words.unsqueeze(-1) >> shifts) & mask  # arithmetic shift; the mask drops sign bits
        codes = codes.reshape(*lead, blocks * 32)
    else:
        w = words.to(torch.int64) & 0xFFFFFFFF
        w = w.reshape(*lead, blocks, bits)
        lo, shift, hi, hi_shift = _gather_plan(bits, str(words.device))
        low = w.index_select(-1, lo) >> shift
        high = w.index_select(-1, hi) << hi_shift
        codes = ((low | high) & mask).reshape(*lead, blocks * 32)
    return codes[..., :n].to(torch.uint8)
