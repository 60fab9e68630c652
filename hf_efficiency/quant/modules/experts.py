"""`QuantExperts`: a layer's fused mixture-of-experts tensors held as one `QuantLinear` per expert matrix.

transformers 5 stores every expert of a layer in one module (``Qwen3MoeExperts``, ``MixtralExperts``,
``Qwen2MoeExperts``, ...) with 3-D parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``
(the family description, :class:`hf_efficiency.families.Experts`, names them). `QuantExperts` replaces such a
module: ``gate_up_projs[e]`` (``H -> 2I``) and ``down_projs[e]`` (``I -> H``) are `QuantLinear` modules, so each
expert matrix owns its packed tensors, its groups (along its own input dimension) and its kernels. Checkpoint
keys are ``...mlp.experts.gate_up_projs.3.weight``, ``...gate_up_projs.3.weight_scale``, .... The lists are
not called ``gate_up_proj`` / ``down_proj`` on purpose: on save, transformers' ``revert_weight_conversion``
takes every key starting ``experts.gate_up_proj.`` for the fused float tensor and splits it per expert.

The forward has the original signature and routing (``hidden_states [T, H]``, ``top_k_index [T, k]``,
``top_k_weights [T, k]``): only the experts some token routes to run, each through its two `QuantLinear`
modules with the original activation, ``down(act_fn(gate) * up) * weight``. The router stays a float module
of the layer. Experts are weight-only (no int8 activations).

Algorithms: the data-free methods (``rtn``, ``hqq``) quantize each expert matrix themselves; the calibrated
ones (``awq``, ``gptq``) have no per-expert calibration statistics here, so experts fall back to
round-to-nearest with the same format (a warning is logged).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import logging

from ...families import Experts, UnsupportedFamilyError
from ..methods import get_method, quantize_matrix
from .linear import QuantLinear, outlier_count, scale_dtype_of

if TYPE_CHECKING:
    from ...config import QuantizationSpec

logger = logging.get_logger(__name__)

#: attribute names of the per-expert `QuantLinear` lists (checkpoint keys ``<experts>.<list>.<e>.<tensor>``)
GATE_UP = "gate_up_projs"
DOWN = "down_projs"
#: which list a fused float parameter goes to: ``"gate_up"`` or ``"down"``
KINDS = ("gate_up", "down")


def experts_spec(spec: QuantizationSpec) -> QuantizationSpec:
    """The spec experts are quantized with: ``spec`` for data-free methods (rtn, hqq), round-to-nearest with
    the same format for calibrated ones (awq, gptq; a warning is logged)."""
    if not get_method(spec.method).calibrated:
        return spec
    logger.warning(
        f"quantization method {spec.method!r} needs per-module calibration statistics, which fused mixture-of-"
        "experts tensors do not get: the experts are quantized with round-to-nearest ('rtn') in the same format; "
        "attention and the other linears use the method"
    )
    return spec.with_method("rtn")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors are empty on the meta device (its ``config`` shared, not copied)."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    config = getattr(module, "config", None)
    if config is not None:
        memo[id(config)] = config
    return copy.deepcopy(module, memo)


def _layout(experts: nn.Module, desc: Experts) -> tuple[int, int, int]:
    """``(num_experts, hidden, intermediate)`` of a fused experts module; raises `UnsupportedFamilyError`
    when its tensors are not the ``[E, 2I, H]`` / ``[E, H, I]`` gated layout without biases."""
    cls = type(experts).__name__
    gate_up, down = getattr(experts, desc.gate_up, None), getattr(experts, desc.down, None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise UnsupportedFamilyError(
            f"{cls} has no fused expert tensors {desc.gate_up!r} and {desc.down!r} (as the family description says)"
        )
    other = sorted({n for n, _ in experts.named_parameters()} - {desc.gate_up, desc.down})
    other += sorted(n for n, _ in experts.named_buffers())
    if other:
        raise UnsupportedFamilyError(
            f"{cls} holds tensors besides {desc.gate_up} and {desc.down} ({', '.join(other)}); quantized experts "
            "support the gated layout without biases only"
        )
    flags = {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False}
    wrong = [f"{k}={getattr(experts, k)!r}" for k, v in flags.items() if getattr(experts, k, v) != v]
    if wrong or gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
        raise UnsupportedFamilyError(
            f"{cls} ({', '.join(wrong) or f'shapes {list(gate_up.shape)}, {list(down.shape)}'}): quantized experts "
            "need gate_up [E, 2I, H] (gate rows then up rows) and down [E, H, I]"
        )
    num, hidden, inter = gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2
    if tuple(down.shape) != (num, hidden, inter):
        raise UnsupportedFamilyError(
            f"{cls}: {desc.down} has shape {list(down.shape)}, expected {[num, hidden, inter]} from {desc.gate_up}"
        )
    if not hasattr(experts, "act_fn"):
        raise UnsupportedFamilyError(f"{cls} has no act_fn (the activation of the gate)")
    return int(num), int(hidden), int(inter)


class QuantExperts(nn.Module):
    """A fused mixture-of-experts module with each expert matrix in a `QuantLinear` (see the module docstring).

    Build it with :meth:`shell` (empty, e.g. on the meta device for loading a checkpoint) or
    :meth:`from_float`; :meth:`to_float` gives back the original fused module with de-quantized tensors."""

    def __init__(
        self,
        gate_up_projs: list[QuantLinear],
        down_projs: list[QuantLinear],
        act_fn: nn.Module,
        *,
        desc: Experts = Experts(),
        float_template: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(gate_up_projs) != len(down_projs) or not gate_up_projs:
            raise ValueError(
                f"need one gate_up and one down QuantLinear per expert, got {len(gate_up_projs)} and {len(down_projs)}"
            )
        self.num_experts = len(gate_up_projs)
        self.hidden_dim = gate_up_projs[0].in_features
        self.intermediate_dim = down_projs[0].in_features
        shape = (self.hidden_dim, 2 * self.intermediate_dim, self.intermediate_dim, self.hidden_dim)
        for g, d in zip(gate_up_projs, down_projs):
            if (g.in_features, g.out_features, d.in_features, d.out_features) != shape:
                raise ValueError("every expert needs gate_up H -> 2I and down I -> H QuantLinear modules")
        self.gate_up_projs = nn.ModuleList(gate_up_projs)
        self.down_projs = nn.ModuleList(down_projs)
        self.act_fn = act_fn
        self.desc = desc
        # the original module with meta tensors (not a submodule: no state), rebuilt by `to_float`
        self.__dict__["_float_template"] = float_template

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def shell(
        cls,
        experts: nn.Module,
        spec: QuantizationSpec,
        name: str,
        *,
        desc: Experts = Experts(),
        device: torch.device | str | None = None,
    ) -> "QuantExperts":
        """Empty `QuantLinear` modules for every expert of the fused ``experts`` module (named ``name`` in the
        model; each matrix's format is ``spec.format_of("<name>.gate_up_projs.<e>")``), on ``device`` (default:
        where ``experts``' tensors are, i.e. meta inside ``from_pretrained``)."""
        num, hidden, inter = _layout(experts, desc)
        device = getattr(experts, desc.gate_up).device if device is None else device

        def make(list_name: str, e: int, in_features: int, out_features: int) -> QuantLinear:
            fmt = spec.format_of(f"{name}.{list_name}.{e}")
            return QuantLinear(
                in_features,
                out_features,
                False,
                bits=fmt["bits"],
                group_size=fmt["group_size"],
                symmetric=fmt["symmetric"],
                scale_dtype=scale_dtype_of(fmt["scale_dtype"]),
                device=device,
                outliers=outlier_count(in_features, spec.outliers),
                act_order=fmt["act_order"],
                zero_point=fmt.get("zero_point", "float"),
            )

        module = cls(
            [make(GATE_UP, e, hidden, 2 * inter) for e in range(num)],
            [make(DOWN, e, inter, hidden) for e in range(num)],
            experts.act_fn,
            desc=desc,
            float_template=_meta_copy(experts),
        )
        module.requires_grad_(False)
        return module

    @classmethod
    @torch.no_grad()
    def from_float(
        cls, experts: nn.Module, spec: QuantizationSpec, name: str, *, desc: Experts = Experts()
    ) -> "QuantExperts":
        """Quantize every expert matrix of the fused float ``experts`` module with ``quantize_matrix``: rtn and
        hqq use themselves; calibrated methods (awq, gptq) fall back to round-to-nearest (`experts_spec`, logged).
        ``experts`` is left unchanged."""
        spec = experts_spec(spec)
        module = cls.shell(experts, spec, name, desc=desc)
        for kind, param in (("gate_up", desc.gate_up), ("down", desc.down)):
            module.quantize_fused_(kind, getattr(experts, param), spec, name=name)
        return module

    @torch.no_grad()
    def quantize_fused_(self, kind: str, weight: torch.Tensor, spec: QuantizationSpec, name: str = "experts") -> None:
        """Quantize the fused float tensor ``weight`` (``[E, 2I, H]`` for ``kind="gate_up"``, ``[E, H, I]`` for
        ``"down"``) one expert at a time into this module's `QuantLinear` list (through
        `QuantLinear.load_quantized`); calibrated methods fall back to round-to-nearest (`experts_spec`). ``name``
        (the module's path) names the expert in errors."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; allowed values: {', '.join(KINDS)}")
        linears = self.gate_up_projs if kind == "gate_up" else self.down_projs
        expected = (self.num_experts, linears[0].out_features, linears[0].in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{kind}: fused tensor has shape {list(weight.shape)}, expected {list(expected)}")
        method_spec = experts_spec(spec)
        for e, linear in enumerate(linears):
            q = quantize_matrix(
                weight[e],
                method_spec,
                linear.bits,
                scale_dtype=linear.weight_scale.dtype,
                outliers=linear.outliers,
                name=f"{name}.{GATE_UP if kind == 'gate_up' else DOWN}.{e}",
            )
            linear.load_quantized(q)

    @torch.no_grad()
    def to_float(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The original fused experts module (same class and attributes) holding the de-quantized tensors."""
        template = self.__dict__.get("_float_template")
        if template is None:
            raise ValueError("this QuantExperts was built without the original module; it cannot be de-quantized")
        module = _meta_copy(template)
        for linears, param in ((self.gate_up_projs, self.desc.gate_up), (self.down_projs, self.desc.down)):
            stacked = torch.stack([linear.dequantize_weight(dtype) for linear in linears])
            setattr(module, param, nn.Parameter(stacked))
        return module

    # --- computation ---------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # index num_experts: a token routed to no local expert (expert parallelism), as transformers skips it
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit.flatten().tolist():
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = self.gate_up_projs[expert_idx](hidden_states[token_idx]).chunk(2, dim=-1)
            current = self.down_projs[expert_idx](self.act_fn(gate) * up)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        g = self.gate_up_projs[0]
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
            f"bits={g.bits}, group_size={g.group_size}, symmetric={g.symmetric}"
        )
