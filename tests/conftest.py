"""Shared offline fixtures: a byte-level tokenizer (1 token per UTF-8 byte) and tiny Llamas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_VOCAB = 257  # 256 byte symbols + <eos>


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every UTF-8 byte is one token (ids 0-255), <eos> = 256."""
    # id == byte value, in every process (ByteLevel.alphabet() is an unordered set)
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(seed: int = 0, tie: bool = True, **overrides) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama over the byte vocabulary, deterministic for a seed."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=256,
    )
    cfg = LlamaConfig(**{**kwargs, **overrides})
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer()


@pytest.fixture
def tiny_llama() -> Callable[..., LlamaForCausalLM]:
    return make_tiny_llama


def reference_model(config: LlamaConfig, tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
    """A float32 Llama holding a checkpoint's float tensors (``tensors``) and reference de-quantized linear
    weights (``weights``, by module name): what a compressed checkpoint must compute."""
    ref = LlamaForCausalLM(config).eval()
    sd = {k: v.float() for k, v in tensors.items() if k in ref.state_dict()}
    sd.update({f"{n}.weight": w for n, w in weights.items()})
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        ref.tie_weights()
    return ref
