"""Our integer codes and float tensors -> ggml block bytes (pure, vectorized tensor functions).

The inverse of :mod:`hf_efficiency.formats.gguf_blocks` for the legacy block types, each a block of 32
weights with a float16 scale ``d`` (and minimum ``m``):

=======  =====  =============================================  ===========================================
type     bytes  layout of one block                            weight
=======  =====  =============================================  ===========================================
Q8_0     34     ``d``, 32 x int8 ``q``                         ``d * q``         (ours: ``q = u - 128``)
Q4_0     18     ``d``, 16 bytes of nibbles                     ``d * (q - 8)``
Q4_1     20     ``d``, ``m``, 16 bytes of nibbles              ``d * q + m``
Q5_0     22     ``d``, uint32 of high bits, 16 bytes nibbles   ``d * (q - 16)``
Q5_1     24     ``d``, ``m``, uint32 high bits, 16 bytes       ``d * q + m``
=======  =====  =============================================  ===========================================

Nibbles: byte ``j`` of a block holds weight ``j`` in its low and weight ``j + 16`` in its high nibble; the
5-bit types keep the fifth bit of weight ``j`` in bit ``j`` of a little-endian uint32.

Every encoder takes codes ``uint8 [rows, n]``, float32 scales (and minima) ``[rows, n / 32]`` whose values
are exact in float16, and returns ``uint8 [rows, n / 32 * block_bytes]``: the bytes ``gguf.GGUFWriter``
stores for a ``[rows, n]`` tensor of that type. Float tensors are written in the smallest type that holds
them exactly when asked (:func:`exact_float_encoding`); :func:`q8_0_exact` recovers a Q8_0 block's scale
and codes from weights that came out of a Q8_0 block (any tensor that ``d * q`` can express, where ``d``
is float16 and ``q`` int8), so a de-quantized Q8_0 embedding is written back byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

BLOCK = 32
#: ggml type name -> (bits, symmetric, bytes per block)
BLOCK_TYPES: dict[str, tuple[int, bool, int]] = {
    "Q8_0": (8, True, 34),
    "Q4_0": (4, True, 18),
    "Q4_1": (4, False, 20),
    "Q5_0": (5, True, 22),
    "Q5_1": (5, False, 24),
}
#: the float types a float tensor can be written in, by size (bytes per weight)
FLOAT_TYPES = ("F16", "BF16", "F32")
_TORCH_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def block_type(bits: int, symmetric: bool) -> str:
    """The ggml type holding ``bits``-bit codes of a symmetric (implicit zero) or float-minimum grid exactly."""
    for name, (b, sym, _) in BLOCK_TYPES.items():
        if b == bits and sym == symmetric:
            return name
    raise ValueError(f"no ggml block type holds {bits}-bit {'symmetric' if symmetric else 'asymmetric'} codes")


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]`` (exact in float16) -> its little-endian float16 bytes ``uint8 [N, 2]``."""
    return x.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, 32]`` codes -> ``[N, 16]`` bytes: weight ``j`` low nibble, weight ``j + 16`` high nibble."""
    return (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)


def _high_bits(codes: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 codes of a block as the 4 bytes of a little-endian uint32 ``[N, 4]``."""
    bits = ((codes >> 4) & 1).to(torch.int32).reshape(-1, 4, 8)
    return (bits << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _blocks(codes: torch.Tensor) -> torch.Tensor:
    rows, n = codes.shape
    if n % BLOCK:
        raise ValueError(f"ggml blocks hold 32 weights; a row of {n} weights is not a whole number of blocks")
    return codes.to(torch.uint8).reshape(rows * n // BLOCK, BLOCK)


def _check_params(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> None:
    rows, n = codes.shape
    want = (rows, n // BLOCK)
    if tuple(scale.shape) != want or (minimum is not None and tuple(minimum.shape) != want):
        raise ValueError(f"block scales/minima must have shape {list(want)} for codes of shape {[rows, n]}")
    for name, t in (("scale", scale), ("minimum", minimum)):
        if t is not None and not torch.equal(t.float().to(torch.float16).float(), t.float()):
            raise ValueError(f"block {name}s must be exact in float16")


def encode_blocks(
    type_name: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """The raw bytes ``uint8 [rows, n / 32 * block_bytes]`` of a ``[rows, n]`` tensor of ``type_name``
    (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) from our unsigned codes and per-block float16-exact scale (and minimum)."""
    if type_name not in BLOCK_TYPES:
        raise ValueError(f"type_name={type_name!r} is not allowed; allowed values: {', '.join(BLOCK_TYPES)}")
    bits, symmetric, nbytes = BLOCK_TYPES[type_name]
    if symmetric != (minimum is None):
        raise ValueError(f"{type_name} {'has no' if symmetric else 'needs a'} minimum")
    _check_params(codes, scale, minimum)
    if codes.numel() and int(codes.max()) > 2**bits - 1:
        raise ValueError(f"{type_name} holds {bits}-bit codes; got a code of {int(codes.max())}")
    rows = codes.shape[0]
    c = _blocks(codes)
    parts = [_f16_bytes(scale.reshape(-1))]
    if minimum is not None:
        parts.append(_f16_bytes(minimum.reshape(-1)))
    if bits == 8:
        parts.append((c.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if bits == 5:
            parts.append(_high_bits(c))
        parts.append(_nibbles(c))
    out = torch.cat(parts, 1)
    assert out.shape[1] == nbytes
    return out.reshape(rows, -1)


def q8_0_exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes ``uint8 [rows, n]`` (``u = q + 128``) and per-block float16 scales ``[rows, n / 32]`` with
    ``d * q == x`` exactly for every weight, or ``None`` when no Q8_0 block holds ``x`` exactly.

    Each block's scale is ``amax / k`` rounded to float16 for the first ``k`` in 127, 128, 126, ..., 1
    that reproduces the block (127 first: what ggml's quantizer chooses, so a de-quantized Q8_0 tensor
    gets its own bytes back)."""
    rows, n = x.shape
    if n % BLOCK or not bool(torch.isfinite(x).all()):
        return None
    xb = x.detach().float().reshape(-1, BLOCK)
    amax = xb.abs().amax(1)
    d = torch.zeros_like(amax)
    q = torch.zeros_like(xb)
    todo = amax > 0

    def attempt(k: float, which: torch.Tensor) -> None:
        idx = which.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        dk = (amax[idx] / k).to(torch.float16).float()
        blk = xb[idx]
        qk = torch.round(blk / dk[:, None])
        ok = (dk > 0) & (qk * dk[:, None] == blk).all(1) & (qk >= -128).all(1) & (qk <= 127).all(1)
        good = idx[ok]
        d[good], q[good] = dk[ok], qk[ok]
        todo[good] = False

    attempt(127.0, todo)
    attempt(128.0, todo)
    if bool(todo.any()):
        # a weight d*q has at most 11 + 7 significant bits: a float32 with more is no Q8_0 weight
        mant, _ = torch.frexp(xb[todo])
        if bool((torch.remainder(mant * 2.0**24, 2.0**6) != 0).any()):
            return None
        for k in range(126, 0, -1):
            attempt(float(k), todo)
            if not bool(todo.any()):
                break
        if bool(todo.any()):
            return None
    codes = (q + 128).to(torch.uint8).reshape(rows, n)
    return codes, d.reshape(rows, n // BLOCK)


def q8_0_nearest(x: torch.Tensor) -> torch.Tensor:
    """ggml's own Q8_0 rounding of float ``x [rows, n]`` (``gguf.quants``): raw bytes ``[rows, n / 32 * 34]``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw = quantize(x.detach().float().cpu().numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(raw))


def decode_raw(type_name: str, raw: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[rows, n]`` that ggml computes from ``raw`` bytes of ``type_name`` (gguf's dequantizer)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = dequantize(raw.numpy(), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(raw.shape[0], n).copy())


def float_raw(type_name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the float type ``type_name`` (F32, F16, BF16) as raw bytes ``uint8 [rows, n * size]``
    (1-D tensors stay 1-D)."""
    t = x.detach().cpu().to(_TORCH_FLOAT[type_name]).contiguous()
    shape = t.shape
    raw = t.reshape(-1, 1).view(torch.uint8)
    return raw.reshape(*shape[:-1], shape[-1] * t.element_size()) if len(shape) else raw.reshape(-1)


def exact_float_encoding(x: torch.Tensor, candidates: tuple[str, ...]) -> tuple[str, torch.Tensor] | None:
    """The first of ``candidates`` (Q8_0, F16, BF16, F32, smallest first) holding ``x [rows, n]`` exactly,
    with its raw bytes, proven by decoding; ``None`` when none does."""
    tests: dict[str, Callable[[], torch.Tensor | None]] = {
        "Q8_0": lambda: _q8_0_raw(x),
        "F16": lambda: _float_if_exact("F16", x),
        "BF16": lambda: _float_if_exact("BF16", x),
        "F32": lambda: _float_if_exact("F32", x),
    }
    for name in candidates:
        raw = tests[name]()
        if raw is not None:
            return name, raw
    return None


def _q8_0_raw(x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() != 2:
        return None
    found = q8_0_exact(x)
    if found is None:
        return None
    raw = encode_blocks("Q8_0", found[0], found[1])
    return raw if torch.equal(decode_raw("Q8_0", raw, x.shape[1]), x.float()) else None


def _float_if_exact(type_name: str, x: torch.Tensor) -> torch.Tensor | None:
    cast = x.detach().cpu().to(_TORCH_FLOAT[type_name])
    if not torch.equal(cast.float(), x.detach().cpu().float()):
        return None
    return float_raw(type_name, x)


__all__ = [
    "BLOCK",
    "BLOCK_TYPES",
    "FLOAT_TYPES",
    "block_type",
    "decode_raw",
    "encode_blocks",
    "exact_float_encoding",
    "float_raw",
    "q8_0_exact",
    "q8_0_nearest",
]
