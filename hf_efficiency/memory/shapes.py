"""What the estimator knows about a model: its config and an empty (meta-device) copy.

Nothing here reads weights. A model is described by its ``config.json`` (a local folder, a
Hub id, a ``PretrainedConfig`` or an already-built model's ``config``); parameter shapes come
from instantiating the architecture on the ``meta`` device, which allocates no memory and
gives exact parameter counts, tied weights and module names for any transformers model.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that drive activation, KV-cache and logits memory, and the facts about a family's layer
    that decide what autograd keeps (read from the config and the family description, `families.py`).

    The defaults describe a Llama layer: pre-norm RMSNorm, separate q/k/v projections with rotary embeddings,
    a gated SiLU MLP."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    model_type: str
    family: str | None = None
    #: "rms" (fp32 math, weight * x_hat in the input dtype), "rms_one_plus" (Gemma: (1 + w) * x_hat in fp32),
    #: "layer" (LayerNorm: saves its input and per-row statistics)
    norm: str = "rms"
    #: Gemma: post-attention and post-feedforward norms on the block outputs besides the two pre-norms
    sandwich_norms: bool = False
    #: per-head RMSNorm on q and k (Qwen3, Gemma 3)
    qk_norm: bool = False
    #: what the MLP activation saves for backward: its input, other tensors of its size, its output
    act_saves_input: bool = True
    act_saves_other: int = 0
    act_saves_output: bool = False
    #: gate and up are halves of one projection's output (Phi-3 gate_up_proj)
    fused_gate_up: bool = False
    #: q, k and v are slices of one projection's output (Phi-3 qkv_proj, GPT-2 c_attn)
    fused_qkv: bool = False
    #: rotary position embeddings; False: learned positions
    rope: bool = True
    #: Gemma 3: one rotary table per layer type (this layer's entry), each used by its layers only
    rope_layer_types: tuple[str, ...] = ()
    #: the rotary embedding concatenates (Phi-3), leaving q heads-major, so SDPA's output is copied for o_proj
    rope_concat: bool = False
    #: eager attention's softmax runs in float32 (and is cast back for 16-bit models); GPT-2's runs in the
    #: compute dtype
    eager_softmax_fp32: bool = True
    #: Gemma 2: tanh soft-capping of the attention logits (eager) and of the final logits
    attn_softcap: bool = False
    final_softcap: bool = False
    #: the forward fills a KV cache (``config.use_cache``); its concatenated k/v are what attention saves
    use_cache: bool = True
    #: sliding-window attention: the window and the layers that use it (sdpa gets a materialized mask there
    #: once the sequence is longer than the window)
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    #: mixture of experts: experts per layer, experts per token, expert width, which layers are sparse
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate_size: int = 0
    sparse_layers: tuple[int, ...] = ()
    #: router probabilities renormalized over the top-k (a division that saves the top-k values and their sum)
    norm_topk_prob: bool = False
    #: Mixtral keeps the routing weights in float32 (the weighted expert outputs become float32)
    router_weights_fp32: bool = False
    #: Qwen2-MoE: an always-on expert of this width with a sigmoid gate (a linear to one output)
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_sets(self) -> int:
        """Rotary cos/sin tables a forward computes."""
        return len(set(self.rope_layer_types)) or 1

    def rope_tables(self, layers) -> int:
        """Rotary tables that the given layers read (each kept once, whatever the number of layers)."""
        layers = list(layers)
        if not self.rope or not layers:
            return 0
        return len({self.rope_layer_types[k] for k in layers}) if self.rope_layer_types else 1

    def sdpa_mask(self, layer: int, seq: int) -> bool:
        """Whether sdpa attention in ``layer`` gets an explicit mask (a sliding window shorter than ``seq``)
        instead of its causal flag."""
        return layer in self.sliding_layers and seq > self.sliding_window

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a mixture-of-experts block instead of a dense MLP."""
        return layer in self.sparse_layers


#: facts the activation rules need that `families.Family` does not carry, keyed by ``Family.name``
FAMILY_MEMORY_FACTS: dict[str, dict[str, Any]] = {
    "gpt2": {"rope": False, "eager_softmax_fp32": False},
    "opt": {"rope": False},
    "phi3": {"rope_concat": True},
    "mixtral": {"norm_topk_prob": True, "router_weights_fp32": True},
    "qwen2_moe": {"shared_expert_gate": "mlp.shared_expert_gate"},
}
#: the same, keyed by ``config.model_type`` where the types of one family differ: Gemma 3 adds q/k norms and
#: one rotary table per layer type (sliding and full attention) to Gemma 2's layout
MODEL_TYPE_MEMORY_FACTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {"qk_norm": True, "rope_per_layer_type": True},
    "gemma3": {"qk_norm": True, "rope_per_layer_type": True},
}


@functools.lru_cache(maxsize=None)
def activation_saves(name: str) -> tuple[bool, int, bool]:
    """(saves its input, other input-sized tensors it saves, saves its output) for the transformers activation
    ``name``, read once from autograd on a small tensor (SiLU: input only; ReLU: output only; GPT-2's
    ``gelu_new`` formula: input and three intermediates). Unknown names count as SiLU."""
    try:
        from transformers.activations import ACT2FN

        fn = ACT2FN[name]
    except (KeyError, ImportError):
        return True, 0, False
    x = torch.linspace(-2.0, 2.0, 32).reshape(4, 8).requires_grad_()  # no draw from the global generator
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    size = x.untyped_storage().nbytes()
    storages = {t.untyped_storage().data_ptr() for t in saved if t.untyped_storage().nbytes() == size}
    saves_input = x.untyped_storage().data_ptr() in storages
    saves_output = y.untyped_storage().data_ptr() in storages
    return saves_input, len(storages) - saves_input - saves_output, saves_output


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
    """Read the dimensions from ``config`` and the layer facts from its family description; a missing required
    field is a ``ValueError``. An undescribed family gets Llama's layer facts (the estimator notes it)."""
    from ..families import family_of

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
    num_layers = _field(config, "num_hidden_layers")
    model_type = str(_field(config, "model_type"))
    act = str(
        _field(config, "hidden_activation")
        or _field(config, "hidden_act")
        or _field(config, "activation_function")
        or ""
    )
    family = family_of(config)
    dims = dict(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=_field(config, "vocab_size"),
        model_type=model_type,
    )
    if family is None:
        gated = model_type not in _PLAIN_MLP_MODEL_TYPES and not (act.startswith("gelu") and model_type in ("None", ""))
        return ModelShape(gated_mlp=gated, **dims)
    facts = {**FAMILY_MEMORY_FACTS.get(family.name, {}), **MODEL_TYPE_MEMORY_FACTS.get(model_type, {})}
    mlp_in = family.roles.get("mlp_in", ())
    fused_gate_up = len(mlp_in) == 1 and len(family.fused.get(mlp_in[0], ())) == 2
    gated = len(mlp_in) >= 2 or fused_gate_up or (not mlp_in and family.experts is not None)
    saves_input, saves_other, saves_output = activation_saves(act or "silu")
    layer_types = _field(config, "layer_types")
    window = _field(config, "sliding_window") or 0
    if not window:
        sliding: tuple[int, ...] = ()
    elif layer_types:
        sliding = tuple(k for k, kind in enumerate(layer_types[:num_layers]) if kind == "sliding_attention")
    else:
        sliding = tuple(range(num_layers))
    rope_layer_types: tuple[str, ...] = ()
    if facts.get("rope_per_layer_type") and layer_types:
        rope_layer_types = tuple(layer_types[:num_layers])
    moe: dict[str, Any] = {}
    experts = family.experts
    if experts is not None:
        num_experts = int(_field(config, experts.num_experts_attr) or 0)
        moe = dict(
            num_experts=num_experts,
            top_k=int(_field(config, experts.top_k_attr) or 0),
            expert_intermediate_size=int(_field(config, experts.intermediate_attr) or inter),
            sparse_layers=_sparse_layers(config, num_layers, num_experts),
            norm_topk_prob=bool(facts.get("norm_topk_prob", _field(config, "norm_topk_prob"))),
            router_weights_fp32=bool(facts.get("router_weights_fp32", False)),
        )
        if experts.shared_expert is not None:
            moe["shared_expert_intermediate_size"] = int(_field(config, "shared_expert_intermediate_size") or 0)
            moe["shared_expert_gate"] = bool(facts.get("shared_expert_gate"))
    return ModelShape(
        gated_mlp=gated,
        family=family.name,
        norm=family.norm,
        sandwich_norms=family.sandwich_norms,
        qk_norm=family.qk_norm or bool(facts.get("qk_norm")),
        act_saves_input=saves_input,
        act_saves_other=saves_other,
        act_saves_output=saves_output,
        fused_gate_up=fused_gate_up,
        fused_qkv=any(name in family.fused for name in family.roles.get("attn_in", ())),
        rope=bool(facts.get("rope", True)),
        rope_layer_types=rope_layer_types,
        rope_concat=bool(facts.get("rope_concat", False)),
        eager_softmax_fp32=bool(facts.get("eager_softmax_fp32", True)),
        attn_softcap=_field(config, "attn_logit_softcapping") is not None,
        final_softcap=_field(config, "final_logit_softcapping") is not None,
        use_cache=_field(config, "use_cache") is not False,
        sliding_window=int(window) if sliding else 0,
        sliding_layers=sliding,
        **moe,
        **dims,
    )


_PLAIN_MLP_MODEL_TYPES = (
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


def _sparse_layers(config, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """Layers with an expert block: all, except Qwen-MoE's ``mlp_only_layers`` and the layers that
    ``decoder_sparse_step`` skips."""
    if num_experts <= 0:
        return ()
    only_mlp = set(_field(config, "mlp_only_layers") or ())
    step = _field(config, "decoder_sparse_step") or 1
    return tuple(k for k in range(num_layers) if k not in only_mlp and (k + 1) % step == 0)


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
