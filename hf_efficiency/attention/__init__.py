"""Attention implementations and KV caches.

* ``attn_implementation="hf_efficiency_blockwise"``: exact attention, block-wise online softmax
  (`blockwise.py`, `functions.py`; registered with transformers' ``AttentionInterface``).
* ``attn_implementation="hf_efficiency_lowrank"``: training-free low-rank approximation (exact recent
  window and sinks, segment-pooled landmarks for the past; `lowrank.py`).
* `QuantizedKVCache`: keys and values stored as int8/int4/int2 codes per token and channel group
  (`kv_quant.py`, `kv_cache.py`), croppable, for ``generate(cache=...)``.
"""

from .blockwise import blockwise_attention
from .functions import (
    BLOCKWISE,
    LOWRANK,
    attention_path,
    blockwise_attention_forward,
    lowrank_attention_forward,
    lowrank_settings,
)
from .kv_cache import QuantizedKVCache, QuantizedKVLayer, cache_nbytes
from .kv_quant import dequantize_kv, kv_bytes_per_token, quantize_kv
from .lowrank import lowrank_attention

__all__ = [
    "BLOCKWISE",
    "LOWRANK",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "attention_path",
    "blockwise_attention",
    "blockwise_attention_forward",
    "cache_nbytes",
    "dequantize_kv",
    "kv_bytes_per_token",
    "lowrank_attention",
    "lowrank_attention_forward",
    "lowrank_settings",
    "quantize_kv",
]
