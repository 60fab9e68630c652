"""One description per model family, read by every capability instead of knowing a family's module names.

A :class:`Family` says where the decoder layers are, which norm or linear feeds which linears (the groups
whose input channels AWQ and SmoothQuant rescale exactly), what the norm computes (``w * x_hat``, Gemma's
``(1 + w) * x_hat``, LayerNorm's ``w * x_hat + b``), which projections are fused, which modules never
quantize (routers), where fused mixture-of-experts tensors live, and the roles of each linear for the
memory estimator and PEFT targets. :func:`family_of` finds the description of a model or config;
:func:`require_family` raises :class:`UnsupportedFamilyError` naming the family and what is missing
when a capability needs a description (scale folding) that we do not have. Users describe their own
architectures with :func:`register_family`.

Capabilities that need no description (round-to-nearest, HQQ, GPTQ, the generic layer walk) use
:func:`decoder_layer_prefixes` / :func:`find_decoder_layers`, which find the layers structurally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: what a norm computes from its normalized input ``x_hat`` (the folding rule depends on it)
NORM_KINDS = ("rms", "rms_one_plus", "layer")
#: the linear roles of a decoder layer, as the memory estimator and PEFT read them
ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


class UnsupportedFamilyError(NotImplementedError):
    """A capability needs a part of a family description that is missing (or the whole description)."""


@dataclass(frozen=True)
class ScalingGroup:
    """A producer whose output channels feed ``consumers`` only, so that dividing the producer's channels by
    ``s`` and multiplying the consumers' input columns by ``s`` leaves the float model unchanged.

    ``producer`` and ``consumers`` are module names relative to the decoder layer. ``part = (i, n)``: only the
    ``i``-th of ``n`` equal row blocks of a fused producer feeds the consumers (v of ``qkv_proj`` is
    ``(2, 3)``, up of ``gate_up_proj`` is ``(1, 2)``). ``needs_one_value_head_per_query_head``: the v -> o
    group is exact only without grouped-query attention (v's rows then map 1:1 to o's columns).
    """

    producer: str
    consumers: tuple[str, ...]
    part: tuple[int, int] | None = None
    needs_one_value_head_per_query_head: bool = False


@dataclass(frozen=True)
class Experts:
    """Fused mixture-of-experts tensors (transformers 5 stores every expert of a layer in one 3-D parameter).

    ``module`` is the experts module relative to the decoder layer; ``gate_up`` ``[E, 2I, H]`` and ``down``
    ``[E, H, I]`` are its parameter names; ``router`` and ``shared_expert`` name the router and an always-on
    expert (a plain MLP) when the family has one."""

    module: str = "mlp.experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    router: str = "mlp.gate"
    shared_expert: str | None = None
    num_experts_attr: str = "num_experts"
    top_k_attr: str = "num_experts_per_tok"
    intermediate_attr: str = "moe_intermediate_size"


@dataclass(frozen=True)
class Family:
    """How one model family is laid out. Module names are relative to a decoder layer."""

    name: str
    model_types: tuple[str, ...]
    norm: str = "rms"
    scaling_groups: tuple[ScalingGroup, ...] = ()
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attention_logit_linears: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    never_quantize: tuple[str, ...] = ()
    experts: Experts | None = None
    conv1d: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    embedding_scale: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"Family.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"Family.roles keys must be among {ROLES}, got {sorted(unknown)}")

    @property
    def norm_weight_offset(self) -> float:
        """``1.0`` for Gemma's ``(1 + w) * x_hat`` norms, else ``0.0``."""
        return 1.0 if self.norm == "rms_one_plus" else 0.0

    @property
    def lora_attention_targets(self) -> tuple[str, ...]:
        """Leaf names of the attention projections (LoRA's usual targets)."""
        return tuple(n.rsplit(".", 1)[-1] for r in ("attn_in", "attn_out") for n in self.roles.get(r, ()))

    def role_of(self, relative_name: str) -> str | None:
        """The role of a linear named relative to its decoder layer (``None`` when it has none)."""
        for role, names in self.roles.items():
            if relative_name in names:
                return role
        return None

    def groups_for(self, layer: nn.Module, config: Any = None) -> list[ScalingGroup]:
        """The scaling groups that apply to this layer: modules that exist, v -> o only without GQA,
        and none through a post-norm LayerNorm (OPT-350m's ``do_layer_norm_before=False``)."""
        if not self.scaling_groups:
            raise UnsupportedFamilyError(
                f"model family {self.name!r} has no scale-folding groups (which norm feeds which linears); "
                "AWQ and SmoothQuant need them. Use method 'rtn', 'hqq' or 'gptq', or register a Family with "
                "scaling_groups"
            )
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        post_norm = text is not None and getattr(text, "do_layer_norm_before", True) is False
        out = []
        for g in self.scaling_groups:
            try:
                producer = layer.get_submodule(g.producer)
                consumers = [layer.get_submodule(c) for c in g.consumers]
            except AttributeError as e:
                raise UnsupportedFamilyError(
                    f"the {self.name!r} family description names {g.producer} -> {', '.join(g.consumers)}, but "
                    f"{type(layer).__name__} has no such module ({e})"
                ) from e
            if post_norm and not isinstance(producer, nn.Linear) and not is_conv1d(producer):
                continue
            if g.needs_one_value_head_per_query_head and _out_features(producer, g.part) != _in_features(consumers[0]):
                continue
            out.append(g)
        return out


# --- the families --------------------------------------------------------------------------------
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_GROUPS = (
    ScalingGroup("input_layernorm", _ATTN),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), needs_one_value_head_per_query_head=True),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)
_LLAMA_ROLES = {
    "attn_in": _ATTN,
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
_MOE_ATTENTION_GROUPS = _LLAMA_GROUPS[:2]
_MOE_ROLES = {"attn_in": _ATTN, "attn_out": ("self_attn.o_proj",)}
_GEMMA_GROUPS = (
    ScalingGroup("input_layernorm", _ATTN),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), needs_one_value_head_per_query_head=True),
    ScalingGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)
_QWEN2_MOE_SHARED = "mlp.shared_expert"

FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, overwrite: bool = False) -> Family:
    """Describe a model family (keyed by every ``config.model_type`` it lists) so that every capability
    reads it; ``overwrite=True`` replaces an existing description."""
    for model_type in family.model_types:
        if model_type in FAMILIES and not overwrite:
            raise ValueError(f"model type {model_type!r} is already described by family {FAMILIES[model_type].name!r}")
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _family in (
    Family(
        "llama",
        ("llama", "mistral", "qwen2"),
        scaling_groups=_LLAMA_GROUPS,
        roles=_LLAMA_ROLES,
        notes="Llama, Mistral and Qwen2/Qwen2.5 (q/k/v biases) share one layout",
    ),
    Family(
        "qwen3",
        ("qwen3",),
        scaling_groups=_LLAMA_GROUPS,
        roles=_LLAMA_ROLES,
        qk_norm=True,
        notes="per-head RMSNorm on q and k after their projections (v -> o folding is unaffected)",
    ),
    Family(
        "gemma",
        ("gemma2", "gemma3_text", "gemma3"),
        norm="rms_one_plus",
        scaling_groups=_GEMMA_GROUPS,
        roles=_LLAMA_ROLES,
        sandwich_norms=True,
        embedding_scale=True,
        notes="(1 + w) RMSNorm, post-attention and post-feedforward norms, soft-capping (Gemma 2), q/k norms "
        "and sliding windows (Gemma 3); embeddings scaled by sqrt(hidden)",
    ),
    Family(
        "phi3",
        ("phi3",),
        scaling_groups=(
            ScalingGroup("input_layernorm", ("self_attn.qkv_proj",)),
            ScalingGroup(
                "self_attn.qkv_proj", ("self_attn.o_proj",), part=(2, 3), needs_one_value_head_per_query_head=True
            ),
            ScalingGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
            ScalingGroup("mlp.gate_up_proj", ("mlp.down_proj",), part=(1, 2)),
        ),
        roles={
            "attn_in": ("self_attn.qkv_proj",),
            "attn_out": ("self_attn.o_proj",),
            "mlp_in": ("mlp.gate_up_proj",),
            "mlp_out": ("mlp.down_proj",),
        },
        attention_logit_linears=(),
        fused={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")},
        notes="fused qkv_proj and gate_up_proj",
    ),
    Family(
        "gpt2",
        ("gpt2",),
        norm="layer",
        conv1d=True,
        scaling_groups=(
            ScalingGroup("ln_1", ("attn.c_attn",)),
            ScalingGroup("attn.c_attn", ("attn.c_proj",), part=(2, 3)),
            ScalingGroup("ln_2", ("mlp.c_fc",)),
        ),
        roles={
            "attn_in": ("attn.c_attn",),
            "attn_out": ("attn.c_proj",),
            "mlp_in": ("mlp.c_fc",),
            "mlp_out": ("mlp.c_proj",),
        },
        attention_logit_linears=(),
        fused={"attn.c_attn": ("q", "k", "v")},
        notes="Conv1D layers (weight stored [in, out]); LayerNorm with bias; GELU MLP (no c_fc -> c_proj fold)",
    ),
    Family(
        "opt",
        ("opt",),
        norm="layer",
        scaling_groups=(
            ScalingGroup("self_attn_layer_norm", _ATTN),
            ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), needs_one_value_head_per_query_head=True),
            ScalingGroup("final_layer_norm", ("fc1",)),
            ScalingGroup("fc1", ("fc2",)),
        ),
        roles={"attn_in": _ATTN, "attn_out": ("self_attn.out_proj",), "mlp_in": ("fc1",), "mlp_out": ("fc2",)},
        notes="LayerNorm with bias, ReLU MLP (fc1 -> fc2 folds: relu(x / s) = relu(x) / s for s > 0), biases",
    ),
    Family(
        "qwen2_moe",
        ("qwen2_moe",),
        scaling_groups=_MOE_ATTENTION_GROUPS
        + (ScalingGroup(f"{_QWEN2_MOE_SHARED}.up_proj", (f"{_QWEN2_MOE_SHARED}.down_proj",)),),
        roles=_MOE_ROLES,
        never_quantize=("mlp.gate", "mlp.shared_expert_gate"),
        experts=Experts(shared_expert=_QWEN2_MOE_SHARED),
        notes="fused experts and a shared expert with its own sigmoid gate; routers stay float",
    ),
    Family(
        "qwen3_moe",
        ("qwen3_moe",),
        scaling_groups=_MOE_ATTENTION_GROUPS,
        roles=_MOE_ROLES,
        qk_norm=True,
        never_quantize=("mlp.gate",),
        experts=Experts(),
        notes="fused experts; q/k norms; the router stays float",
    ),
    Family(
        "mixtral",
        ("mixtral",),
        scaling_groups=_MOE_ATTENTION_GROUPS,
        roles=_MOE_ROLES,
        never_quantize=("mlp.gate",),
        experts=Experts(num_experts_attr="num_local_experts", intermediate_attr="intermediate_size"),
        notes="fused experts; the router stays float",
    ),
):
    register_family(_family)


# --- lookup ----------------------------------------------------------------------------------------
def _model_type(model_or_config: Any) -> str | None:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, dict):
        return config.get("model_type")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None) or getattr(config, "model_type", None)


def family_of(model_or_config: Any) -> Family | None:
    """The description of a model's family (from ``config.model_type``), or ``None`` when undescribed."""
    return FAMILIES.get(_model_type(model_or_config) or "")


def require_family(model_or_config: Any, capability: str) -> Family:
    """The model's family description; raises :class:`UnsupportedFamilyError` naming the model type and what
    ``capability`` needs when the family is not described."""
    family = family_of(model_or_config)
    if family is None:
        model_type = _model_type(model_or_config)
        cls = type(model_or_config).__name__
        raise UnsupportedFamilyError(
            f"{capability} needs a description of model family {model_type!r} ({cls}): which norm feeds which "
            f"linears and what the norm computes. Described families: {', '.join(described_model_types())}. "
            "Methods 'rtn', 'hqq' and 'gptq' need none; or describe it with hf_efficiency.families.register_family"
        )
    return family


def described_model_types() -> list[str]:
    """Every ``config.model_type`` with a description."""
    return sorted(FAMILIES)


# --- layout helpers --------------------------------------------------------------------------------
def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and ``nn.ModuleList`` of the decoder layers (``model.layers``, GPT-2's ``transformer.h``, ...):
    the list named ``*layers``, ``*.h`` or ``*blocks`` with ``config.num_hidden_layers`` entries."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (n is None or len(module) == n):
            if name.endswith("layers") or name.endswith(".h") or name == "h" or name.endswith("blocks"):
                return name, module
    raise ValueError(
        f"could not find the decoder layers of {type(model).__name__} (an nn.ModuleList named '*layers', "
        "'*.h' or '*blocks' with config.num_hidden_layers entries)"
    )


def config_and_text_config(config: Any) -> list:
    """``config`` and its text config (``get_text_config()``; the same object for text-only models), once each."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if get_text is not None else config
    return list({id(c): c for c in (config, text)}.values())


def output_embedding_name(model: nn.Module) -> str | None:
    """The module name of the model's output embedding (``lm_head``), if it has one."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def decoder_layer_prefixes(model: nn.Module, num_layers: int) -> list[str]:
    """Module names of the decoder layers (the ``ModuleList`` with ``num_layers`` entries)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return [f"{name}.{i}" for i in range(num_layers)]
    raise ValueError(f"could not find the {num_layers} decoder layers in {type(model).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer storing its weight ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _out_features(module: nn.Module, part: tuple[int, int] | None) -> int:
    n = module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]
    return n // part[1] if part else n


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[-1]


def _rows(n: int, part: tuple[int, int] | None) -> slice:
    if part is None:
        return slice(None)
    size = n // part[1]
    return slice(part[0] * size, (part[0] + 1) * size)


@torch.no_grad()
def fold_scales(
    producer: nn.Module,
    consumers: list[nn.Module],
    s: torch.Tensor,
    *,
    part: tuple[int, int] | None = None,
    norm_weight_offset: float = 0.0,
) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' input columns by ``s``
    (exact in float). Producers: ``nn.Linear`` / ``Conv1D`` (rows ``part`` of a fused one, bias too) or a
    norm computing ``(offset + w) * x_hat [+ b]``; consumers: ``nn.Linear`` or ``Conv1D``."""
    s = s.to(producer.weight.device)
    if isinstance(producer, nn.Linear) or is_conv1d(producer):
        conv = is_conv1d(producer)
        rows = _rows(producer.weight.shape[1] if conv else producer.weight.shape[0], part)
        if conv:
            producer.weight[:, rows].div_(s.to(producer.weight.dtype).unsqueeze(0))
        else:
            producer.weight[rows].div_(s.to(producer.weight.dtype).unsqueeze(1))
        if getattr(producer, "bias", None) is not None:
            producer.bias[rows].div_(s.to(producer.bias.dtype))
    else:
        w = producer.weight
        if norm_weight_offset:
            w.copy_(((w.float() + norm_weight_offset) / s.float() - norm_weight_offset).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    for consumer in consumers:
        if is_conv1d(consumer):
            consumer.weight.mul_(s.to(consumer.weight.dtype).unsqueeze(1))
        else:
            consumer.weight.mul_(s.to(consumer.weight.dtype).unsqueeze(0))


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing exactly what a GPT-2 ``Conv1D`` computes (its weight transposed)."""
    nx, nf = module.weight.shape
    linear = nn.Linear(nx, nf, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(module.weight.requires_grad)
    return linear


__all__ = [
    "Experts",
    "FAMILIES",
    "Family",
    "ROLES",
    "ScalingGroup",
    "UnsupportedFamilyError",
    "conv1d_to_linear",
    "decoder_layer_prefixes",
    "described_model_types",
    "family_of",
    "find_decoder_layers",
    "fold_scales",
    "is_conv1d",
    "register_family",
    "require_family",
]
