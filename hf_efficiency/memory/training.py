"""Which parameters train: full fine-tuning, LoRA/QLoRA, BitFit, bottleneck adapters, or
freezing the lower layers. Worked out on the empty (meta) model, so counts are exact."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..families import Family, decoder_layer_prefixes, family_of
from .activations import LAYER_ROLES, ROLES, LayerTraining
from .shapes import FAMILY_MEMORY_FACTS, ModelShape

TRAINING_METHODS = ("full", "lora", "qlora", "bitfit", "adapters", "freeze")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_PLACEMENTS = ("pfeiffer", "houlsby")


@dataclass
class TrainingSetup:
    """What trains during fine-tuning.

    * ``full``: every parameter;
    * ``lora`` / ``qlora``: rank-``lora_rank`` adapters on the linears named by ``lora_targets``
      (module-name suffixes as in peft's ``target_modules``, or ``"all-linear"``; the default q/k/v/o
      names stand for the family's attention projections, e.g. GPT-2's ``c_attn``/``c_proj``); ``qlora``
      additionally requires a quantized base (``efficiency_config`` with ``quantization``);
    * ``bitfit``: only the bias terms inside the decoder layers; with ``bitfit_add_missing`` (default,
      as in ``EfficiencyConfig(peft={"method": "bitfit"})``) every linear there without a bias gets a
      zero-initialized trainable one;
    * ``adapters``: a float32 bottleneck adapter of width ``adapter_size`` after every MLP
      (``adapter_placement="pfeiffer"``), or after the attention and after the MLP (``"houlsby"``);
    * ``freeze``: the input embedding and the lower ``freeze_layers`` decoder layers are frozen,
      everything above trains (with tied embeddings the shared matrix is frozen too).
    """

    method: str = "full"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | str = DEFAULT_LORA_TARGETS
    lora_dropout: float = 0.0
    adapter_size: int = 64
    adapter_placement: str = "pfeiffer"
    adapter_nonlinearity: str = "relu"
    bitfit_add_missing: bool = True
    freeze_layers: int = 0

    def __post_init__(self) -> None:
        if self.method not in TRAINING_METHODS:
            raise ValueError(
                f"training method {self.method!r} is not allowed; allowed values: {', '.join(TRAINING_METHODS)}"
            )
        if isinstance(self.lora_targets, list):
            self.lora_targets = tuple(self.lora_targets)
        for key in ("lora_rank", "adapter_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} is not allowed; allowed values: integers >= 1")
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(
                f"adapter_placement={self.adapter_placement!r} is not allowed; allowed values: "
                f"{', '.join(ADAPTER_PLACEMENTS)}"
            )
        if not isinstance(self.freeze_layers, int) or self.freeze_layers < 0:
            raise ValueError(f"freeze_layers={self.freeze_layers!r} is not allowed; allowed values: integers >= 0")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is not allowed; allowed values: [0, 1)")

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @classmethod
    def coerce(cls, value: Any) -> "TrainingSetup":
        """Accept a `TrainingSetup`, a method name, a dict, or a peft ``LoraConfig``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown training key(s) {unknown}; allowed keys: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        if type(value).__name__ == "LoraConfig":
            targets = value.target_modules
            targets = targets if isinstance(targets, str) else tuple(sorted(targets or DEFAULT_LORA_TARGETS))
            return cls(
                method="lora", lora_rank=int(value.r), lora_targets=targets, lora_dropout=float(value.lora_dropout)
            )
        raise TypeError(
            f"training must be a TrainingSetup, one of {TRAINING_METHODS}, a dict or a peft LoraConfig; "
            f"got {type(value).__name__}"
        )


def _matches_target(name: str, targets: tuple[str, ...] | str) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(setup: TrainingSetup, model_or_config: Any) -> tuple[str, ...] | str:
    """The LoRA targets to apply: ``setup.lora_targets``, where the default q/k/v/o names become the family's
    attention projections (``Family.lora_attention_targets``)."""
    if setup.lora_targets == DEFAULT_LORA_TARGETS:
        family = family_of(model_or_config)
        if family is not None and family.lora_attention_targets:
            return family.lora_attention_targets
    return setup.lora_targets


#: names of an undescribed family's linears, by role
_ROLE_NAMES = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "wqkv", "query", "key", "value"),
    "attn_out": ("o_proj", "out_proj", "dense", "wo"),
    "mlp_in": ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc", "fc_in", "dense_h_to_4h"),
    "mlp_out": ("down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h"),
}


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of an ``nn.Linear``-like module or a GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf
    return None


def linear_role(name: str, module: nn.Module, shape: ModelShape) -> str | None:
    """For an undescribed family: ``attn_in`` (q/k/v), ``attn_out`` (o), ``mlp_in`` (gate/up) or ``mlp_out``
    (down), by the module's name, else by where it sits and its shape."""
    dims = linear_dims(module)
    if dims is None:
        return None
    parts = name.lower().split(".")
    for role, names in _ROLE_NAMES.items():
        if parts[-1] in names:
            return role
    in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
    writes_hidden = dims[1] == shape.hidden_size
    if in_attention:
        return "attn_out" if writes_hidden and dims[0] == shape.q_dim else "attn_in"
    return "mlp_out" if writes_hidden else "mlp_in"


def layer_role(
    relative: str, module: nn.Module, shape: ModelShape, family: Family | None, param: str = "weight"
) -> str | None:
    """The role (`activations.LAYER_ROLES`) of module ``relative`` (named relative to its decoder layer) and of
    its parameter ``param``, from the family's ``roles`` and ``experts``; ``None`` for norms. An undescribed
    family falls back to `linear_role`."""
    if family is None:
        return linear_role(relative, module, shape)
    role = family.role_of(relative)
    if role is not None:
        return role
    experts = family.experts
    if experts is not None:
        if relative == experts.module:
            return {experts.gate_up: "expert_in", experts.down: "expert_out"}.get(param)
        if relative == experts.router:
            return "router"
        if relative == FAMILY_MEMORY_FACTS.get(family.name, {}).get("shared_expert_gate"):
            return "shared_gate"
        if experts.shared_expert and relative.startswith(experts.shared_expert + "."):  # a plain gated MLP
            role = linear_role(relative, module, shape)
            return None if role is None else {"mlp_out": "shared_out", "attn_out": "shared_out"}.get(role, "shared_in")
    return linear_role(relative, module, shape)


#: families whose fused experts and router peft adapts too when ``target_modules="all-linear"`` (peft 0.21 with
#: transformers 5 rewrites the v4 expert names into ``target_parameters``: ``gate_up_proj`` at rank 2r for the
#: fused gate and up, ``down_proj`` and the router weight at rank r, each expert its own rank-r block)
PEFT_ALL_LINEAR_EXPERTS = ("qwen3_moe", "mixtral")


def _lora_on_experts(
    model: nn.Module,
    shape: ModelShape,
    family: Family,
    setup: TrainingSetup,
    prefixes: list[str],
    layers: list[LayerTraining],
    added: list[tuple[int, ...]],
) -> int:
    """Add peft's ``ParamWrapper`` LoRA on the experts and router of every sparse layer; returns how many."""
    if setup.lora_dropout:
        raise ValueError(
            f"lora_dropout={setup.lora_dropout!r} is not allowed with lora_targets='all-linear' on {shape.model_type}: "
            "peft adapts its fused experts with ParamWrapper, which refuses dropout; allowed values: 0"
        )
    experts = family.experts
    r = setup.lora_rank
    count = 0
    for k in shape.sparse_layers:
        module = model.get_submodule(f"{prefixes[k]}.{experts.module}")
        router = model.get_submodule(f"{prefixes[k]}.{experts.router}")
        for role, name, rank in (("expert_in", experts.gate_up, 2 * r), ("expert_out", experts.down, r)):
            p = getattr(module, name, None)
            if not isinstance(p, nn.Parameter) or p.dim() != 3 or not p.is_floating_point():
                continue  # quantized experts: peft's ParamWrapper does not adapt them
            e, d_out, d_in = p.shape  # [experts, out, in]
            added.extend([(rank * e, d_in), (d_out, rank * e)])
            layers[k].weight_trainable[role] = True
            layers[k].merged_weight_bytes += p.numel() * p.element_size()
            if p.element_size() != 4:  # the float32 factors, cast to the 16-bit weights' dtype to merge
                layers[k].merged_weight_bytes += rank * e * (d_in + d_out) * p.element_size()
            count += 1
        w = getattr(router, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and w.is_floating_point():
            added.extend([(r, w.shape[1]), (w.shape[0], r)])
            layers[k].weight_trainable["router"] = True
            layers[k].merged_weight_bytes += w.numel() * w.element_size()
            count += 1
    return count


@dataclass
class TrainablePlan:
    """Trainable parameter count (existing + added), per-layer flags for the activation rules."""

    trainable_parameters: int
    added_parameters: int
    trainable_numels: dict[str, int]
    added_shapes: list[tuple[int, ...]]
    layers: list[LayerTraining] = field(default_factory=list)
    embedding_trainable: bool = False
    lm_head_trainable: bool = False
    final_norm_trainable: bool = False
    largest_trainable: int = 0


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if linear_dims(m) is not None]


def plan_training(
    model: nn.Module,
    shape: ModelShape,
    setup: TrainingSetup,
    lm_head_name: str | None,
    tied: bool,
    dropout_mask_bytes: int = 1,
) -> TrainablePlan:
    """Mark what trains in ``model`` (a meta model, possibly with quantized linears). Roles come from the
    family description (`layer_role`); ``dropout_mask_bytes`` is LoRA dropout's mask (1: CUDA's bool mask,
    0: a mask in the adapters' dtype, as on CPU)."""
    family = family_of(model)
    prefixes = decoder_layer_prefixes(model, shape.num_layers)
    layer_of = {p: k for k, p in enumerate(prefixes)}

    def layer_index(name: str) -> int | None:
        for p, k in layer_of.items():
            if name == p or name.startswith(p + "."):
                return k
        return None

    def role_in_layer(name: str, module: nn.Module, param: str = "weight") -> str | None:
        k = layer_index(name)
        relative = name[len(prefixes[k]) + 1 :] if k is not None else name
        return layer_role(relative, module, shape, family, param)

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weight = emb.weight if emb is not None else None
    lm_head_weight = f"{lm_head_name}.weight" if lm_head_name else None
    layers = [LayerTraining() for _ in prefixes]
    trainable: dict[str, int] = {}
    added: list[tuple[int, ...]] = []
    seen: set[int] = set()
    flags = {"embedding": False, "positions": False, "lm_head": False, "final_norm": False}

    def mark(name: str, p) -> None:
        if id(p) in seen or getattr(p, "dtype", None) is None or not p.is_floating_point():
            return
        seen.add(id(p))
        trainable[name] = p.numel()
        k = layer_index(name)
        module_name = name.rpartition(".")[0]
        if p is emb_weight:
            flags["embedding"] = True
            flags["lm_head"] = flags["lm_head"] or tied
        if name == lm_head_weight:
            flags["lm_head"] = True
        module = model.get_submodule(module_name)
        leaf = name.rpartition(".")[2]
        if k is None:
            if isinstance(module, nn.Embedding) and p is not emb_weight:
                flags["positions"] = True  # learned positions (GPT-2, OPT) are added to the layers' input
            elif p is not emb_weight and (
                "norm" in type(module).__name__.lower() or "norm" in module_name.split(".")[-1]
            ):
                flags["final_norm"] = True
            return
        role = role_in_layer(module_name, module, leaf)
        if role is not None:
            if leaf != "bias":
                layers[k].weight_trainable[role] = True
        elif leaf == "weight":
            layers[k].norm_trainable = True

    params = list(model.named_parameters(remove_duplicate=True))
    if setup.method == "full":
        for name, p in params:
            mark(name, p)
    elif setup.method == "bitfit":
        for name, module in model.named_modules():
            k = layer_index(name)
            if k is None or not name:
                continue
            bias = dict(module.named_parameters(recurse=False)).get("bias")
            dims = linear_dims(module)
            if bias is None and not (dims is not None and setup.bitfit_add_missing):
                continue
            role = role_in_layer(name, module) if dims is not None else None
            if bias is not None:
                mark(f"{name}.bias", bias)
            else:
                added.append((dims[1],))
            if role is not None:
                layers[k].bias_trainable[role] = True
            else:
                layers[k].norm_trainable = True
        if not trainable and not added:
            raise ValueError(
                f"BitFit trains bias terms, and this {shape.model_type} model has none; choose another method "
                "or let it add zero-initialized ones (bitfit_add_missing=True)"
            )
    elif setup.method == "freeze":
        if setup.freeze_layers > shape.num_layers:
            raise ValueError(
                f"freeze_layers={setup.freeze_layers} is larger than the model's {shape.num_layers} layers; "
                f"allowed values: 0..{shape.num_layers}"
            )
        for name, p in params:
            k = layer_index(name)
            if p is emb_weight or (k is not None and k < setup.freeze_layers):
                continue
            mark(name, p)
    elif setup.uses_lora:
        matched = 0
        targets = lora_targets(setup, model)
        for name, module in _linears(model):
            if lm_head_name and name == lm_head_name or not _matches_target(name, targets):
                continue
            k = layer_index(name)
            if k is None:
                continue
            d_in, d_out = linear_dims(module)
            smallest = min(d_in, d_out)
            if setup.lora_rank > smallest and smallest > 1:  # a one-output gate (Qwen2-MoE) takes any rank
                raise ValueError(
                    f"lora_rank={setup.lora_rank} is larger than {name}'s smaller dimension ({smallest}); "
                    f"allowed values: 1..{smallest}"
                )
            added += [(setup.lora_rank, d_in), (d_out, setup.lora_rank)]
            role = role_in_layer(name, module)
            if role is None:
                raise ValueError(f"LoRA target {name} has no role in the {shape.model_type} layer description")
            layers[k].lora_modules[role] += 1
            matched += 1
        if targets == "all-linear" and family is not None and family.name in PEFT_ALL_LINEAR_EXPERTS:
            matched += _lora_on_experts(model, shape, family, setup, prefixes, layers, added)
        if not matched:
            raise ValueError(f"lora_targets={targets!r} matched no linear layer of this model")
        for lt in layers:
            lt.lora_rank, lt.lora_dropout = setup.lora_rank, float(setup.lora_dropout)
            lt.lora_bytes = 4  # peft keeps adapters (and computes them) in float32
            lt.dropout_mask_bytes = dropout_mask_bytes
    elif setup.method == "adapters":
        m, h = setup.adapter_size, shape.hidden_size
        count = 2 if setup.adapter_placement == "houlsby" else 1
        added.extend([(m, h), (m,), (h, m), (h,)] * count * shape.num_layers)
        for lt in layers:
            lt.adapter_size, lt.adapter_count = setup.adapter_size, count
            lt.adapter_keeps_both = setup.adapter_nonlinearity != "relu"
    # a layer's input needs a gradient when anything below it trains
    below = flags["embedding"] or flags["positions"]
    for lt in layers:
        lt.grad_in = below
        below = below or lt.trains
    numels = list(trainable.values()) + [math.prod(s) for s in added]
    return TrainablePlan(
        trainable_parameters=sum(numels),
        added_parameters=sum(numels) - sum(trainable.values()),
        trainable_numels=trainable,
        added_shapes=added,
        layers=layers,
        embedding_trainable=flags["embedding"],
        lm_head_trainable=flags["lm_head"],
        final_norm_trainable=flags["final_norm"],
        largest_trainable=max(numels, default=0),
    )


__all__ = [
    "LAYER_ROLES",
    "PEFT_ALL_LINEAR_EXPERTS",
    "ROLES",
    "TRAINING_METHODS",
    "TrainablePlan",
    "TrainingSetup",
    "layer_role",
    "linear_dims",
    "linear_role",
    "lora_targets",
    "plan_training",
]
