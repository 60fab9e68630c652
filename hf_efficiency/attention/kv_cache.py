"""`QuantizedKVCache`: a ``transformers.Cache`` whose layers keep keys and values as int8/int4/int2
codes (`kv_quant.py`), croppable (speculative decoding) and usable by ``generate(cache=...)``.

Each layer returns the dequantized history followed by the current step's exact states, so a new
token attends to itself and to the tokens of its own forward pass without quantization error, and to
earlier tokens through their stored codes. ``residual_length`` keeps that many most recent tokens in
float as well (KIVI's recent window); 0 stores every cached token quantized.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from .kv_quant import check_kv_args, dequantize_kv, quantize_kv


class QuantizedKVLayer(DynamicLayer):
    """One layer: quantized history (codes, scales, minima, each ``[b, h_kv, t, ...]``) plus an optional
    float window of the most recent ``residual_length`` tokens."""

    is_croppable = True

    def __init__(self, bits: int = 8, group_size: int = 64, residual_length: int = 0) -> None:
        super().__init__()
        check_kv_args(bits, group_size)
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length={residual_length!r} is not allowed; allowed values: integers >= 0")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.q: list[tuple[Tensor, Tensor, Tensor] | None] = [None, None]  # keys, values

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        check_kv_args(self.bits, self.group_size, key_states.shape[-1])
        self.dtype = key_states.dtype

    def _quantized_length(self) -> int:
        return 0 if self.q[0] is None else self.q[0][0].shape[-2]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self._quantized_length() + (self.keys.shape[-2] if self.keys.numel() else 0)

    def _append(self, i: int, states: Tensor) -> None:
        new = quantize_kv(states, self.bits, self.group_size)
        old = self.q[i]
        self.q[i] = new if old is None else tuple(torch.cat([a, n], dim=-2) for a, n in zip(old, new))

    def _history(self, i: int) -> Tensor | None:
        if self.q[i] is None:
            return None
        return dequantize_kv(*self.q[i], self.bits, self.group_size, self.dtype)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        parts = []
        for i, (window, new) in enumerate(((self.keys, key_states), (self.values, value_states))):
            history = self._history(i)
            pieces = [p for p in (history, window if window.numel() else None, new) if p is not None]
            parts.append(torch.cat(pieces, dim=-2) if len(pieces) > 1 else pieces[0])
        # store: the float window takes the new tokens, and what overflows it is quantized once
        keys = torch.cat([self.keys, key_states], dim=-2) if self.keys.numel() else key_states
        values = torch.cat([self.values, value_states], dim=-2) if self.values.numel() else value_states
        overflow = keys.shape[-2] - self.residual_length
        if overflow > 0:
            self._append(0, keys[..., :overflow, :])
            self._append(1, values[..., :overflow, :])
            keys, values = keys[..., overflow:, :], values[..., overflow:, :]
        self.keys, self.values = keys, values
        return parts[0], parts[1]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        q_len = self._quantized_length()
        if keep >= q_len:  # only the float window shrinks
            self.keys, self.values = self.keys[..., : keep - q_len, :], self.values[..., : keep - q_len, :]
            return
        self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]
        self.q = [tuple(t[..., :keep, :] for t in q) for q in self.q]

    def _select(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.q = [None if q is None else tuple(fn(t) for t in q) for q in self.q]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        self.q = [None, None]
        super().reset()

    def nbytes(self) -> int:
        """Bytes held: codes, scales and minima, plus the float window."""
        total = sum(t.numel() * t.element_size() for q in self.q if q is not None for t in q)
        if self.is_initialized:
            total += sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return total


class QuantizedKVCache(Cache):
    """A cache storing keys and values as ``bits``-wide codes per token and group of ``group_size``
    channels (float16 scale and minimum per group)::

        cache = QuantizedKVCache(bits=8, group_size=64)
        model.generate(input_ids, cache=cache, max_new_tokens=256)
        cache.nbytes(), cache.bytes_per_token()
    """

    def __init__(self, bits: int = 8, group_size: int = 64, residual_length: int = 0) -> None:
        QuantizedKVLayer(bits, group_size, residual_length)  # validate now, not at the first forward
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        super().__init__(
            layer_class_to_replicate=functools.partial(QuantizedKVLayer, bits, group_size, residual_length)
        )

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        length = self.get_seq_length()
        return self.nbytes() / length / (self.layers[0].keys.shape[0] if self.layers else 1) if length else 0.0


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache holds: `QuantizedKVCache.nbytes` for ours, keys plus values for any other
    ``transformers.Cache`` whose layers keep float tensors (``DynamicCache``, ``StaticCache``)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if layer.is_initialized
        for t in (layer.keys, layer.values)
    )


def saved_kv_cache(model) -> QuantizedKVCache | None:
    """A new `QuantizedKVCache` as the model's saved ``EfficiencyConfig(attention={"kv_cache_bits": ...})``
    asks, or ``None``."""
    from ..config import saved_section

    spec = saved_section(model, "attention")
    if spec is None or spec.kv_cache_bits is None:
        return None
    return QuantizedKVCache(spec.kv_cache_bits, spec.kv_group_size, spec.kv_residual_length)


#: ``generate(cache_implementation=...)`` name of `QuantizedKVCache` (with ``cache_config={"bits": 8, ...}``)
CACHE_IMPLEMENTATION = "hf_efficiency_quantized"


def cache_from_generate_kwargs(kwargs: dict) -> QuantizedKVCache | None:
    """Pop ``cache_implementation="hf_efficiency_quantized"`` (and its ``cache_config``: ``bits``,
    ``group_size``, ``residual_length``) from ``generate`` kwargs and build the cache; ``None`` otherwise."""
    if kwargs.get("cache_implementation") != CACHE_IMPLEMENTATION:
        return None
    kwargs.pop("cache_implementation")
    config = dict(kwargs.pop("cache_config", None) or {})
    unknown = sorted(set(config) - {"bits", "group_size", "residual_length"})
    if unknown:
        raise ValueError(
            f"unknown cache_config key(s) {unknown} for cache_implementation={CACHE_IMPLEMENTATION!r}; "
            "allowed keys: bits, group_size, residual_length"
        )
    return QuantizedKVCache(**config)
