"""What the estimator knows about a model: its config and an empty (meta-device) copy.

Nothing here reads weights. A model is described by its ``config.json`` (a local folder, a
Hub id, a ``PretrainedConfig`` or an already-built model's ``config``); parameter shapes come
from instantiating the architecture on the ``meta`` device, which allocates no memory and
gives exact parameter counts, tied weights and module names for any transformers model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that drive activation, KV-cache and logits memory."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    model_type: str

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def load_config(source: Any, trust_remote_code: bool = False):
    """A ``PretrainedConfig`` from a config, a model, a local folder or a Hub id (config.json only)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise ValueError(f"{type(source).__name__} has no `config`; pass a transformers model or its config")
        return config
    if isinstance(source, dict):
        if "model_type" not in source:
            raise ValueError("a config dict needs 'model_type' (as in config.json)")
        data = dict(source)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path} has no config.json; the estimator reads only the model's config")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    raise TypeError(
        "expected a transformers model, a PretrainedConfig, a config dict, a local folder or a Hub id; "
        f"got {type(source).__name__}"
    )


def _field(config, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        text = getattr(config, "get_text_config", None)
        if callable(text):
            value = getattr(text(), name, None)
    return value


def model_shape(config) -> ModelShape:
    """Read the dimensions from ``config``; a missing required field is a ``ValueError``."""
    missing = [f for f in REQUIRED_FIELDS if not isinstance(_field(config, f), int)]
    if missing:
        raise ValueError(
            f"config ({getattr(config, 'model_type', type(config).__name__)}) lacks {', '.join(missing)}; "
            f"the memory estimator needs {', '.join(REQUIRED_FIELDS)} (decoder-only language models)"
        )
    hidden = _field(config, "hidden_size")
    heads = _field(config, "num_attention_heads")
    kv_heads = _field(config, "num_key_value_heads") or heads
    head_dim = _field(config, "head_dim") or hidden // heads
    inter = _field(config, "intermediate_size") or _field(config, "n_inner") or _field(config, "ffn_dim")
    if inter is None:
        inter = 4 * hidden
    act = str(_field(config, "hidden_act") or _field(config, "activation_function") or "")
    gated = _field(config, "model_type") not in (
        "gpt2",
        "opt",
        "gpt_neox",
        "gpt_neo",
        "gptj",
        "bloom",
        "falcon",
        "phi",
        "codegen",
        "mpt",
        "starcoder2",
    )
    if act.startswith("gelu") and _field(config, "model_type") in (None, ""):
        gated = False
    return ModelShape(
        hidden_size=hidden,
        num_layers=_field(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=_field(config, "vocab_size"),
        gated_mlp=gated,
        model_type=str(_field(config, "model_type")),
    )


def build_meta_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture with every tensor on the ``meta`` device (no memory, exact shapes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as err:  # not a causal LM: fall back to the bare model
            from transformers import AutoModel

            try:
                return AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            except ValueError:
                raise err from None


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def output_embedding_names(model: nn.Module) -> tuple[str | None, bool]:
    """(name of the lm_head weight, whether it is tied to the input embedding)."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return None, False
    name = next((n for n, m in model.named_modules() if m is out), None)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    tied = emb is not None and out.weight is emb.weight
    return name, tied
