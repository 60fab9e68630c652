"""Tiny random models of every described family, built from each family's transformers config over the byte
vocabulary of `conftest.make_byte_tokenizer` (257 tokens). Shared by the family test matrix and the memory tests.

Each config keeps the family's distinguishing features: Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma's
(1 + w) norms, sandwich norms, soft-capping (Gemma 2) and sliding windows (Gemma 3), Phi-3's fused
projections, GPT-2's Conv1D, OPT's LayerNorm and ReLU, and the fused experts of the mixture-of-experts
families. Four query heads share two key/value heads (grouped-query attention) except where the family has no
GQA; ``equal_heads=True`` gives every query head its own value head (the v -> o scaling group applies then).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

VOCAB = 257
EOS = 256

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=EOS,
    pad_token_id=EOS,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)

#: model_type -> config overrides (on top of the common tiny dimensions)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {},  # q/k/v biases are built in
    "qwen3": {},  # q/k norms are built in
    "gemma2": {
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 16,
        "query_pre_attn_scalar": 16,
        "attn_implementation": "eager",
    },
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 16},  # layer_types: sliding, full, ...
    "phi3": {"head_dim": None},
    "gpt2": "gpt2",
    "opt": "opt",
    "qwen2_moe": {**_MOE, "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3_moe": {**_MOE, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}
FAMILIES = tuple(FAMILY_CONFIGS)
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")


def family_config(model_type: str, equal_heads: bool = False, **overrides) -> PretrainedConfig:
    """The tiny config of ``model_type`` (see the module docstring)."""
    spec = FAMILY_CONFIGS[model_type]
    if spec == "gpt2":
        kw = dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=EOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    elif spec == "opt":
        kw = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            bos_token_id=EOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    else:
        kw = {**_COMMON, **spec}
        if equal_heads:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        kw = {k: v for k, v in kw.items() if v is not None}
    kw.update(overrides)
    if model_type == "gemma3_text":
        kw["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["num_hidden_layers"])
        ]
    attn = kw.pop("attn_implementation", None)
    config = AutoConfig.for_model(model_type, **kw)
    if attn:
        config._attn_implementation = attn
    return config


def make_family_model(model_type: str, seed: int = 0, equal_heads: bool = False, **overrides):
    """A deterministic tiny random model of ``model_type`` in eval mode, with norms and biases randomized
    (a fresh model's norms are 1 / 0, which would hide a wrong folding rule)."""
    torch.manual_seed(seed)
    config = family_config(model_type, equal_heads=equal_heads, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "bias" in name or _offset_norm(model) else 1.0))
    return model.eval()


def _offset_norm(model) -> bool:
    return model.config.model_type.startswith("gemma")
