"""Attention implementations (issue 7, in progress): ``hf_efficiency_blockwise`` (exact, block-wise online
softmax, registered with transformers' ``AttentionInterface``; select with
``attn_implementation="hf_efficiency_blockwise"``)."""

from .blockwise import blockwise_attention
from .functions import BLOCKWISE, attention_path, blockwise_attention_forward

__all__ = ["BLOCKWISE", "attention_path", "blockwise_attention", "blockwise_attention_forward"]
