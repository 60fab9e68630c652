"""Memory per device of a multi-device run: data parallel, ZeRO / FSDP sharding, tensor parallel, offload.

A `ParallelPlan` names the strategy; `estimate_parallel` (what ``estimate_memory(..., parallel=...)``
calls) divides each term of the one-device estimate as that strategy divides it and adds the buffers
it really holds. Each strategy is defined by how PyTorch runs it, so each can be measured
(`measure_parallel.measure_memory_parallel`):

* ``dp``: ``DistributedDataParallel`` as ``transformers.Trainer`` / accelerate wrap it
  (``gradient_as_bucket_view=False``): every device holds everything, plus DDP's gradient buckets,
  one more copy of all gradients;
* ``zero1``: DDP with ``torch.distributed.optim.ZeroRedundancyOptimizer``: optimizer states (and an
  fp32 master copy) sharded by whole tensors, torch's greedy partition, largest first;
* ``zero2``: FSDP2 ``fully_shard(reshard_after_forward=False)`` (FSDP1 ``SHARD_GRAD_OP``): parameters,
  gradients and optimizer states sharded at rest; every parameter stays gathered from its forward until
  its backward;
* ``zero3`` = ``fsdp-full``: FSDP2 ``fully_shard`` (FSDP1 ``FULL_SHARD``) as accelerate's
  ``fsdp2_prepare_model`` wraps a transformers model: every decoder layer a unit, the untied input
  embedding a unit, the tail (final norm, lm_head, the tied embedding) a unit kept gathered from its forward
  to its backward; a unit is gathered for its forward and again for its backward (the next one prefetched),
  and its unsharded gradients go through a reduce-scatter input that FSDP2 keeps until the next one;
* ``fsdp-hybrid``: the same on a 2-D mesh, sharded over ``shard_size`` devices (a node), replicated
  across the groups (FSDP1 ``HYBRID_SHARD``).

``tp`` (Megatron-style tensor parallel) splits attention heads, key/value heads, the MLP's intermediate
size and the vocabulary (embeddings and lm_head, padded up) by ``tp``; norms stay replicated. Each rank is
estimated as the model with those dimensions divided, so weights, LoRA/quantized layouts, activations of
the split parts, logits and the KV cache follow from the one-device rules; the data-parallel strategy then
runs over ``devices / tp`` ranks. ``offload_optimizer`` moves optimizer states, the fp32 master copy and
the fp32 gradient shard the host optimizer reads to CPU memory (the ``host`` field, outside ``total``);
``offload_params`` also moves the parameter shards (``zero3`` / ``fsdp-*``). On CPU (gloo) all-gather and
reduce-scatter go through a full-size temporary, which the estimate counts for ``device="cpu"``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .estimator import EstimateContext, MemoryBreakdown
    from .scenarios import MemoryScenario

STRATEGIES = ("dp", "zero1", "zero2", "zero3", "fsdp-full", "fsdp-hybrid")
#: strategies that shard parameters at rest (FSDP2)
FSDP_STRATEGIES = ("zero2", "zero3", "fsdp-full", "fsdp-hybrid")
#: strategies that keep parameters sharded between uses (``offload_params`` applies)
PARAM_SHARDED = ("zero3", "fsdp-full", "fsdp-hybrid")
#: strategies whose gradients are all-reduced by DDP's buckets
DDP_STRATEGIES = ("dp", "zero1")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed; allowed values: {allowed}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class ParallelPlan:
    """How one run is spread over ``devices`` accelerators (see the module docstring).

    ``devices`` is the world size; ``tp`` the tensor-parallel degree (it divides ``devices``; the
    data-parallel strategy runs over ``devices / tp`` ranks); ``shard_size`` the devices one parameter is
    sharded over with ``fsdp-hybrid`` (usually a node's GPUs; it divides ``devices / tp``);
    ``offload_optimizer`` / ``offload_params`` put optimizer states / parameter shards in host memory;
    ``gradient_as_bucket_view`` is DDP's flag (``False`` in ``Trainer`` and accelerate), with which the
    gradients are views of the buckets instead of a second copy.
    """

    devices: int = 1
    strategy: str = "dp"
    tp: int = 1
    shard_size: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_as_bucket_view: bool = False

    def __post_init__(self) -> None:
        for name in ("devices", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "integers >= 1")
        if self.strategy not in STRATEGIES:
            _fail("strategy", self.strategy, ", ".join(STRATEGIES))
        for name in ("offload_optimizer", "offload_params", "gradient_as_bucket_view"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True, False")
        if self.devices % self.tp:
            _fail("tp", self.tp, f"divisors of devices={self.devices}: {_divisors(self.devices)}")
        dp = self.devices // self.tp
        if self.strategy == "fsdp-hybrid":
            if self.shard_size is None:
                raise ValueError(
                    "strategy='fsdp-hybrid' needs shard_size (the devices one shard group spans, usually a node); "
                    f"allowed values: divisors of the {dp} data-parallel devices: {_divisors(dp)}"
                )
            if not isinstance(self.shard_size, int) or isinstance(self.shard_size, bool) or self.shard_size < 1:
                _fail("shard_size", self.shard_size, f"divisors of the {dp} data-parallel devices: {_divisors(dp)}")
            if dp % self.shard_size:
                raise ValueError(
                    f"shard_size={self.shard_size} does not divide the {dp} data-parallel devices "
                    f"(devices={self.devices} / tp={self.tp}); allowed values: {_divisors(dp)}"
                )
        elif self.shard_size is not None:
            raise ValueError(
                f"shard_size={self.shard_size!r} applies to strategy='fsdp-hybrid' only "
                f"(strategy={self.strategy!r}); allowed values: None"
            )
        if self.offload_optimizer and self.strategy == "dp":
            raise ValueError(
                "offload_optimizer=True needs a strategy that shards the optimizer (DDP steps on every device); "
                f"allowed strategies: {', '.join(STRATEGIES[1:])}"
            )
        if self.offload_params and self.strategy not in PARAM_SHARDED:
            raise ValueError(
                f"offload_params=True needs sharded parameters (strategy={self.strategy!r}); "
                f"allowed strategies: {', '.join(PARAM_SHARDED)}"
            )
        if self.offload_params and not self.offload_optimizer:
            raise ValueError(
                "offload_params=True needs offload_optimizer=True (the optimizer steps where the parameter shards "
                "are); allowed values: offload_optimizer=True"
            )

    # --- derived --------------------------------------------------------------------------
    @property
    def data_parallel(self) -> int:
        """Ranks the data-parallel strategy runs over (``devices / tp``)."""
        return self.devices // self.tp

    @property
    def shard_degree(self) -> int:
        """Devices one sharded tensor is split over (1 for ``dp``)."""
        if self.strategy == "dp":
            return 1
        return self.shard_size if self.strategy == "fsdp-hybrid" else self.data_parallel

    @property
    def is_single_device(self) -> bool:
        """One device, no sharding: the plain one-device estimate."""
        return self.devices == 1 and self.strategy == "dp"

    def describe(self) -> str:
        """``'zero3 on 8 devices (tp 2)'``."""
        text = f"{self.strategy} on {self.devices} device{'s' if self.devices > 1 else ''}"
        extras = [f"tp {self.tp}"] if self.tp > 1 else []
        if self.strategy == "fsdp-hybrid":
            extras.append(f"shard size {self.shard_size}")
        if self.offload_params:
            extras.append("parameters and optimizer offloaded")
        elif self.offload_optimizer:
            extras.append("optimizer offloaded")
        return text + (f" ({', '.join(extras)})" if extras else "")

    # --- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelPlan:
        from .scenarios import dataclass_from_dict

        return dataclass_from_dict(cls, data, "parallel plan")

    @classmethod
    def coerce(cls, value: Any) -> ParallelPlan:
        """A `ParallelPlan` from itself or its dict."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise ValueError(
            f"parallel={value!r} is not allowed; allowed values: a ParallelPlan, its dict or its JSON text"
        )


# --- tensor parallel: one rank's model --------------------------------------------------------
_TP_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def tp_config(config, tp: int):
    """The config of one tensor-parallel rank: heads, key/value heads and intermediate size divided by
    ``tp``, the vocabulary padded up to a multiple of ``tp`` and divided, ``head_dim`` kept."""
    from .shapes import model_shape

    shape = model_shape(config)
    if tp == 1:
        return config
    if shape.num_experts:
        raise ValueError(
            f"tp={tp} with a mixture-of-experts model ({shape.model_type}) is not modelled (experts are split by "
            "expert parallelism, which this estimator does not describe); allowed values: 1"
        )
    sizes = {
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "intermediate_size": shape.intermediate_size,
    }
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        raise ValueError(
            f"tp={tp} does not divide {', '.join(f'{k}={v}' for k, v in bad.items())}; allowed values: common "
            f"divisors of {', '.join(f'{k}={v}' for k, v in sizes.items())}: "
            f"{', '.join(str(d) for d in range(1, shape.num_heads + 1) if all(v % d == 0 for v in sizes.values()))}"
        )
    sliced = copy.deepcopy(config)
    for name, value in sizes.items():
        setattr(sliced, name, value // tp)
    sliced.head_dim = shape.head_dim
    sliced.vocab_size = math.ceil(shape.vocab_size / tp)
    if isinstance(getattr(sliced, "pad_token_id", None), int) and sliced.pad_token_id >= sliced.vocab_size:
        sliced.pad_token_id = None  # the padding row sits on another rank; memory is the same
    return sliced


def _check_tp_split(full: nn.Module, rank: nn.Module, prefix: str, tp: int, model_type: str) -> None:
    """Every matrix of decoder layer ``prefix`` must be ``tp`` times smaller on a rank (Megatron's column /
    row split); a family whose attention ignores ``head_dim`` in the config is refused."""
    params = dict(rank.named_parameters())
    for name, p in full.named_parameters():
        if not name.startswith(prefix + ".") or p.dim() < 2:
            continue
        if name not in params or params[name].numel() * tp != p.numel():
            raise ValueError(
                f"tp={tp} is not modelled for model type {model_type!r} ({name} does not split by {tp}: its layer "
                "does not take head_dim / heads / intermediate_size from the config); allowed values: 1"
            )


# --- the tensors of one rank --------------------------------------------------------------------
@dataclass
class _Tensor:
    """One parameter (or buffer) of a rank's model, as the sharding rules see it."""

    shape: tuple[int, ...]
    elsize: float
    param: bool = True
    #: FSDP unit, as accelerate wraps a transformers model: a decoder layer's index, "embed" (the input
    #: embedding, its own unit when untied) or "tail" (final norm and lm_head, the tied embedding, the rest)
    unit: int | str = "tail"
    trainable: bool = False
    grad_elsize: int = 0
    optimizer_bytes: int = 0
    master_elsize: int = 0
    state_bytes: int = 0  # bytes per optimizer-state element (peft's fp32 adapters: 4)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return round(self.numel * self.elsize)


def _unit_of(name: str, prefixes: list[str], is_embedding: bool, tied: bool) -> int | str:
    for k, p in enumerate(prefixes):
        if name.startswith(p + "."):
            return k
    return "embed" if is_embedding and not tied else "tail"


def _inventory(ctx: EstimateContext, optimizer: str) -> list[_Tensor]:
    """Parameters, buffers and added adapters of the estimated model with their gradient, optimizer and
    master-copy bytes (the one-device terms, tensor by tensor)."""
    from ..families import decoder_layer_prefixes
    from .estimator import optimizer_state_bytes, unique_tensors
    from .shapes import output_embedding_names

    meta, plan = ctx.meta, ctx.plan
    prefixes = decoder_layer_prefixes(meta, ctx.shape.num_layers)
    _, tied = output_embedding_names(meta)
    emb = meta.get_input_embeddings() if hasattr(meta, "get_input_embeddings") else None
    emb_weight = getattr(emb, "weight", None)
    trainable = plan.trainable_numels if plan is not None else {}
    out = []
    for name, t in unique_tensors(meta):
        unit = _unit_of(name, prefixes, t is emb_weight, tied)
        item = _Tensor(tuple(t.shape), t.element_size(), isinstance(t, nn.Parameter), unit, name in trainable)
        if item.trainable:
            item.grad_elsize, item.state_bytes = ctx.pbytes, ctx.state_bytes
            item.optimizer_bytes = optimizer_state_bytes(optimizer, [item.shape], ctx.state_bytes)
            item.master_elsize = 4 if ctx.master else 0
        out.append(item)
    if plan is not None:
        added = plan.added_shapes
        for i, shape in enumerate(added):  # in layer order; spread evenly over the layers
            layer = min(i * len(prefixes) // max(len(added), 1), len(prefixes) - 1)
            b = ctx.added_bytes
            out.append(
                _Tensor(
                    tuple(shape), b, True, layer, True, b, optimizer_state_bytes(optimizer, [shape], 4), state_bytes=4
                )
            )
    return out


def _fsdp_shard(shape: tuple[int, ...], s: int) -> tuple[int, ...]:
    """FSDP2's local shard: dim 0 split in ``s`` chunks, padded to equal size."""
    if not shape:
        return (1,)
    return (math.ceil(shape[0] / s), *shape[1:])


def _greedy_partition(tensors: list[_Tensor], ranks: int) -> list[list[_Tensor]]:
    """``ZeroRedundancyOptimizer``'s partition: largest tensor first, each to the rank holding least."""
    sizes = [0] * ranks
    parts: list[list[_Tensor]] = [[] for _ in range(ranks)]
    for t in sorted(tensors, key=lambda t: t.numel, reverse=True):
        r = sizes.index(min(sizes))
        parts[r].append(t)
        sizes[r] += t.numel
    return parts


@dataclass
class _Shards:
    """One device's share of the sharded terms."""

    weights: int = 0  # parameter shards (FSDP) or all parameters
    gradients: int = 0
    optimizer_states: int = 0
    master: int = 0
    host_gradients: int = 0  # fp32 gradient shard the host optimizer reads (offload)
    trainable: int = 0  # elements the device's optimizer steps
    largest: int = 0


def _step_workspace(optimizer: str, device: str, shards: _Shards, ctx: EstimateContext) -> int:
    from .estimator import optimizer_step_bytes

    if not shards.trainable:
        return 0
    return optimizer_step_bytes(optimizer, device, shards.trainable, shards.largest, ctx.state_bytes)


def _zero1_shards(tensors: list[_Tensor], ranks: int) -> list[_Shards]:
    trainable = [t for t in tensors if t.trainable]
    out = []
    for part in _greedy_partition(trainable, ranks):
        out.append(
            _Shards(
                optimizer_states=sum(t.optimizer_bytes for t in part),
                master=sum(t.numel * t.master_elsize for t in part),
                host_gradients=sum(t.numel * 4 for t in part),
                trainable=sum(t.numel for t in part),
                largest=max((t.numel for t in part), default=0),
            )
        )
    return out


def _fsdp_shards(tensors: list[_Tensor], s: int, optimizer: str) -> _Shards:
    from .estimator import optimizer_state_bytes

    out = _Shards()
    for t in tensors:
        if not t.param:
            continue
        shard = _fsdp_shard(t.shape, s)
        n = math.prod(shard)
        out.weights += round(n * t.elsize)
        if t.trainable:
            out.gradients += n * t.grad_elsize
            out.optimizer_states += optimizer_state_bytes(optimizer, [shard], t.state_bytes)
            out.master += n * t.master_elsize
            out.host_gradients += n * 4
            out.trainable += n
            out.largest = max(out.largest, n)
    return out


@dataclass
class _Units:
    """Bytes an FSDP unit holds gathered (padded to equal shards) and its unsharded gradients."""

    layers: list[int]
    layer_grads: list[int]
    embed: int = 0
    embed_grads: int = 0
    tail: int = 0
    tail_grads: int = 0

    @property
    def tied(self) -> bool:
        """The input embedding sits in the tail unit (tied to lm_head): gathered for the whole step."""
        return self.embed == 0


def _units(tensors: list[_Tensor], s: int, num_layers: int, gather_bytes: int | None = None) -> _Units:
    """The FSDP units of ``tensors``; ``gather_bytes``: fp32 parameters are gathered and their gradients
    reduced in this width (FSDP's ``MixedPrecisionPolicy(param_dtype=...)``)."""
    out = _Units([0] * num_layers, [0] * num_layers)
    for t in tensors:
        if not t.param:
            continue
        full = s * math.prod(_fsdp_shard(t.shape, s))
        width = gather_bytes if gather_bytes is not None and t.elsize == 4 else None
        size = round(full * (width or t.elsize))
        grad = full * (width or t.grad_elsize) if t.trainable else 0
        if isinstance(t.unit, int):
            out.layers[t.unit] += size
            out.layer_grads[t.unit] += grad
        else:
            setattr(out, t.unit, getattr(out, t.unit) + size)
            setattr(out, f"{t.unit}_grads", getattr(out, f"{t.unit}_grads") + grad)
    return out


@dataclass
class _Timeline:
    """FSDP2's step replayed unit by unit: the largest moment and the largest buffers."""

    shard: int
    gloo: bool
    activations: int = 0
    logits: int = 0
    gradient_shards: int = 0
    gathered: dict[str, int] = dataclasses.field(default_factory=dict)
    unsharded_grads: dict[str, int] = dataclasses.field(default_factory=dict)
    kept: int = 0  # the forward's last all-gather output, or the last reduce-scatter input
    prefetched: set[str] = dataclasses.field(default_factory=set)
    peak: int = 0  # activations + logits + gradient shards + buffers, at their largest moment
    buffers: int = 0  # buffers alone, at their largest moment

    def mark(self, transient: int = 0) -> None:
        held = sum(self.gathered.values()) + sum(self.unsharded_grads.values()) + self.kept + transient
        self.buffers = max(self.buffers, held)
        self.peak = max(self.peak, held + self.activations + self.logits + self.gradient_shards)

    def all_gather(self, name: str, size: int, forward: bool, prefetch: bool = False) -> None:
        """All-gather into a flat output (gloo: through a temporary copy), then copy out into the parameters. The
        forward keeps each output until the next unit's copy-out; backward copies a prefetched output out when
        its unit's turn comes and frees it at once."""
        if name in self.gathered:
            if name in self.prefetched:  # copy-out of the prefetched output: both alive for a moment
                self.prefetched.discard(name)
                self.mark(size)
            return
        self.mark(size + (size if self.gloo else 0))
        if forward:
            self.kept = 0
        self.gathered[name] = size
        if prefetch:
            self.prefetched.add(name)
            return
        self.mark(size)
        if forward:
            self.kept = size

    def reduce_scatter(self, name: str) -> None:
        """Copy the unit's unsharded gradients into a reduce-scatter input (gloo: reduced through a temporary
        copy); the input is kept until the next unit's reduce-scatter."""
        grads = self.unsharded_grads.pop(name, 0)
        self.kept = 0
        self.mark(2 * grads + (grads if self.gloo else 0) + grads // self.shard)
        self.kept = grads


def _fsdp_timeline(
    u: _Units,
    *,
    shard: int,
    activations: int,
    logits: int,
    reshard_after_forward: bool,
    gloo: bool,
    training: bool,
    keep_gradient_shards: bool = True,
) -> _Timeline:
    """Replay FSDP2 as accelerate wraps a transformers model: every decoder layer a unit, the untied input
    embedding a unit, the tail (final norm, lm_head; the tied embedding) a unit kept gathered from its forward
    to its backward. Forward gathers each unit for its compute; backward gathers a unit while prefetching the
    next, creates its unsharded gradients, reshards it and reduce-scatters them. Activations are freed layer
    by layer (``activations / layers`` each), the loss buffers after lm_head's backward."""
    t = _Timeline(shard=shard, gloo=gloo)
    n = len(u.layers)
    per_layer = activations // max(n, 1)
    units = [(str(k), u.layers[k], u.layer_grads[k]) for k in range(n)]
    head = [("tail", u.tail, u.tail_grads)] if u.tied else [("embed", u.embed, u.embed_grads)]
    forward = head + units + ([] if u.tied else [("tail", u.tail, u.tail_grads)])
    for name, size, _ in forward:
        t.all_gather(name, size, forward=True)
        if name == "tail" and not u.tied or name == "tail" and n == 0:
            t.logits = logits
        elif name not in ("embed", "tail"):
            t.activations += per_layer if training else 0
        t.mark()
        if reshard_after_forward and name != "tail":
            del t.gathered[name]
    if u.tied:
        t.logits = logits
        t.mark()
    t.kept = 0
    if not training:
        return t
    sizes = {name: (size, grads) for name, size, grads in forward}
    order = [name for name, _, _ in reversed(forward) if not (u.tied and name == "tail")]
    if u.tied:
        order.append("tail")
        t.unsharded_grads["tail"] = u.tail_grads  # lm_head's gradient first, the embedding's added at the end
    for i, name in enumerate(order):
        size, grads = sizes[name]
        t.all_gather(name, size, forward=False)
        if i + 1 < len(order):  # backward prefetch of the next unit
            t.all_gather(order[i + 1], sizes[order[i + 1]][0], forward=False, prefetch=True)
        if not (u.tied and name == "tail"):
            t.unsharded_grads[name] = grads
        t.mark()
        if name == "tail" or (u.tied and i == 0):
            t.logits = 0
        if name not in ("embed", "tail"):
            t.activations = max(t.activations - per_layer, 0)
        del t.gathered[name]
        t.reduce_scatter(name)
        t.gradient_shards += grads // shard if keep_gradient_shards else 0
        t.mark()
    t.kept = 0
    return t


# --- the per-device estimate -------------------------------------------------------------------
def estimate_parallel(
    model: Any, s: MemoryScenario, plan: ParallelPlan, *, label: str = "", trust_remote_code: bool = False
) -> MemoryBreakdown:
    """The per-device `MemoryBreakdown` of scenario ``s`` run as ``plan`` describes (module docstring)."""
    from .estimator import estimate_with_context
    from .shapes import load_config, model_shape

    config = load_config(model, trust_remote_code=trust_remote_code)
    full, full_ctx = estimate_with_context(config, s, label=label, trust_remote_code=trust_remote_code)
    if plan.tp > 1:
        rank_config = tp_config(config, plan.tp)
        b, ctx = estimate_with_context(rank_config, s, label=label, trust_remote_code=trust_remote_code)
        from ..families import decoder_layer_prefixes

        prefix = decoder_layer_prefixes(full_ctx.meta, full_ctx.shape.num_layers)[0]
        _check_tp_split(full_ctx.meta, ctx.meta, prefix, plan.tp, model_shape(config).model_type)
        b.parameters, b.trainable_parameters = full.parameters, full.trainable_parameters
        b.details["parameters_per_tp_rank"] = sum(t.numel() for t in ctx.meta.parameters())
    else:
        b, ctx = full, full_ctx
    tensors = _inventory(ctx, s.optimizer)
    if s.mode == "training":
        _training(b, ctx, tensors, plan, s)
    else:
        _inference(b, ctx, tensors, plan)
    b.details["parallel"] = plan.to_dict()
    b.details["data_parallel"] = plan.data_parallel
    b.details["shard_degree"] = plan.shard_degree
    if plan.tp > 1:
        b.notes.append(
            f"tensor parallel {plan.tp}: heads, key/value heads, MLP width and vocabulary split by {plan.tp}, norms "
            "replicated; its all-reduces work in place on the activations (no buffer counted), no sequence parallelism"
        )
    return b


def _gloo(b: MemoryBreakdown, shard: int) -> bool:
    """CPU collectives run on gloo, whose all-gather and reduce-scatter go through a full-size temporary."""
    return b.device.split(":", 1)[0] == "cpu" and shard > 1


def _replicated_extra(b: MemoryBreakdown, tensors: list[_Tensor]) -> int:
    """Weight bytes outside the parameters (buffers, kernel layout caches, mixed-bit corrections)."""
    return b.weights - sum(t.nbytes for t in tensors if t.param)


def _training(b: MemoryBreakdown, ctx: EstimateContext, tensors: list[_Tensor], plan: ParallelPlan, s) -> None:
    strategy, n, sd = plan.strategy, plan.data_parallel, plan.shard_degree
    activations, logits, lm_grad = b.activations, b.logits, ctx.lm_head_grad
    dequant = b.workspace - ctx.step_workspace
    master = b.weight_copies if ctx.master else 0
    autocast = b.weight_copies - master  # 16-bit copies autocast makes of fp32 weights: never sharded
    buckets = b.gradients if strategy in DDP_STRATEGIES and n > 1 and not plan.gradient_as_bucket_view else 0
    policy = None
    if strategy == "dp":
        shards = _Shards(b.weights, b.gradients, b.optimizer_states, master, 0, b.trainable_parameters)
        step = ctx.step_workspace
        fsdp = False
    elif strategy == "zero1":
        per_rank = _zero1_shards(tensors, n)
        worst = max(range(n), key=lambda r: per_rank[r].optimizer_states + per_rank[r].master)
        shards = per_rank[worst]
        shards.weights, shards.gradients = b.weights, b.gradients
        step = _step_workspace(s.optimizer, s.device_type, shards, ctx)
        b.details["optimizer_states_per_rank"] = [r.optimizer_states + r.master for r in per_rank]
        fsdp = False
    else:
        shards = _fsdp_shards(tensors, sd, s.optimizer)
        shards.weights += _replicated_extra(b, tensors)
        step = _step_workspace(s.optimizer, s.device_type, shards, ctx)
        # 16-bit compute over fp32 weights: FSDP's MixedPrecisionPolicy (as accelerate sets it) gathers the
        # units and reduces their gradients in 16 bits; no autocast copies remain
        policy = 2 if autocast else None
        autocast = 0
        units = _units(tensors, sd, ctx.shape.num_layers, gather_bytes=policy)
        timeline = _fsdp_timeline(
            units,
            shard=sd,
            activations=activations,
            logits=logits,
            reshard_after_forward=strategy != "zero2",
            gloo=_gloo(b, sd),
            training=True,
            keep_gradient_shards=not plan.offload_optimizer,
        )
        fsdp = True
        b.details.update(gathered_layer=max(units.layers, default=0), embedding_unit=units.embed, tail_unit=units.tail)
    host = 0
    gradients, optimizer_states, copies = shards.gradients, shards.optimizer_states, shards.master + autocast
    if plan.offload_optimizer:
        host += shards.optimizer_states + shards.master + shards.host_gradients
        optimizer_states, copies, step = 0, autocast, 0
        if fsdp:
            gradients = 0  # reduced gradients go straight to the host optimizer
    weights = shards.weights
    if plan.offload_params:
        param_shards = sum(round(math.prod(_fsdp_shard(t.shape, sd)) * t.elsize) for t in tensors if t.param)
        host += param_shards
        weights -= param_shards
    workspace = step + dequant
    if fsdp:
        peak_backward, communication = timeline.peak, timeline.buffers
    else:
        peak_backward, communication = activations + logits + lm_grad + buckets, buckets
    peak_step = gradients + workspace + buckets
    b.weights, b.weight_copies, b.gradients, b.optimizer_states = weights, copies, gradients, optimizer_states
    b.workspace, b.communication, b.host = workspace, communication, host
    b.overlap = max(peak_backward, peak_step) - (activations + logits + gradients + workspace + communication)
    b.notes.append(_training_note(plan, buckets))
    if fsdp and policy:
        b.notes[:] = [n for n in b.notes if not n.startswith("autocast over fp32 weights")]
        b.notes.append(
            "16-bit compute over fp32 weights as FSDP's MixedPrecisionPolicy: units gathered and gradients reduced "
            "in 16 bits, no autocast copies"
        )


def _training_note(plan: ParallelPlan, buckets: int) -> str:
    head = f"per device: {plan.describe()}"
    if plan.strategy in DDP_STRATEGIES:
        bucket = (
            "DDP's gradient buckets (a second copy of the gradients)"
            if buckets
            else "no gradient buckets (one data-parallel rank or gradient_as_bucket_view=True)"
        )
        what = "optimizer states sharded by whole tensors (largest rank shown), " if plan.strategy == "zero1" else ""
        return f"{head}: {what}{bucket}"
    kept = "every unit gathered from its forward to its backward" if plan.strategy == "zero2" else "two units gathered"
    return (
        f"{head}: parameters, gradients and optimizer states sharded over {plan.shard_degree}; {kept} (FSDP2 units "
        "as accelerate wraps them: decoder layers, input embedding, final norm + lm_head), unsharded gradients "
        "and their reduce-scatter copies"
    )


def _inference(b: MemoryBreakdown, ctx: EstimateContext, tensors: list[_Tensor], plan: ParallelPlan) -> None:
    if plan.strategy not in PARAM_SHARDED:
        b.notes.append(
            f"per device: {plan.describe()}: inference holds the full weights on every device"
            + ("" if plan.strategy == "dp" else f" ({plan.strategy} shards training state only)")
        )
        return
    sd = plan.shard_degree
    shards = _fsdp_shards(tensors, sd, "sgd")
    u = _units(tensors, sd, ctx.shape.num_layers)
    layer = max(u.layers, default=0)
    gathered = _fsdp_timeline(
        u, shard=sd, activations=0, logits=0, reshard_after_forward=True, gloo=_gloo(b, sd), training=False
    ).buffers
    weights = shards.weights + _replicated_extra(b, tensors)
    if plan.offload_params:
        b.host = shards.weights
        weights -= shards.weights
    b.weights, b.communication = weights, gathered
    b.details.update(gathered_layer=layer, embedding_unit=u.embed, tail_unit=u.tail)
    b.notes.append(
        f"per device: {plan.describe()}: weights sharded over {sd}; each FSDP unit gathered while it computes"
        + ("; the optimizer is not used in inference" if plan.offload_optimizer else "")
    )


# --- does it fit ----------------------------------------------------------------------------------
class DeviceMemoryError(ValueError):
    """The per-device estimate exceeds the device's memory; the message names the term."""


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory_size(text: str | int) -> int:
    """Bytes in ``'80GB'`` (10^9), ``'80GiB'`` (2^30), ``'512MiB'``, ``'1.5TB'`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"device_memory={text!r} is not allowed; allowed values: a size such as 80GB, 80GiB, 512MiB or bytes"
        )
    unit = m.group(2).lower()
    base = _UNITS[unit[:1] if unit[:1] != "b" else ""]
    if "i" in unit:
        base = 2 ** (10 * {"k": 1, "m": 2, "g": 3, "t": 4}[unit[0]])
    return int(float(m.group(1)) * base)


def _suggestions(stage: str, plan: ParallelPlan | None, b: MemoryBreakdown) -> list[str]:
    plan = plan or ParallelPlan()
    more_tp = plan.tp * 2
    out: list[str] = []
    if stage == "weights":
        if plan.strategy not in PARAM_SHARDED:
            out.append("zero3 / fsdp-full (shards the weights)")
        elif plan.strategy == "fsdp-hybrid" and plan.shard_size < plan.data_parallel:
            out.append("a larger --shard-size")
        elif not plan.offload_params:
            out.append("--offload-params")
        out.append(f"--tp {more_tp}")
        out.append("quantized weights (--bits 8 or 4)")
    elif stage == "states":
        if plan.data_parallel == 1:
            out.append("more devices with zero1 / zero2 / zero3 / fsdp-full (shard the optimizer states)")
        elif plan.strategy == "dp":
            out.append("zero1 / zero2 / zero3 / fsdp-full (shard the optimizer states)")
        if not plan.offload_optimizer:
            out.append("--offload-optimizer" + (" with a sharded strategy" if plan.strategy == "dp" else ""))
        out.append(f"--tp {more_tp}")
        out.append("LoRA (--training lora) or a smaller optimizer (--optimizer adamw_8bit)")
    else:
        if b.mode == "training" and "recomputed_layer_per_sequence" not in b.details:
            out.append("--gradient-checkpointing")
        out.append("a smaller --batch-size or --sequence-length")
        if plan.strategy in DDP_STRATEGIES and b.mode == "training":
            out.append("zero2 / zero3 / fsdp-full (shard the gradients)")
        out.append(f"--tp {more_tp}")
    return out


def check_fits(
    b: MemoryBreakdown, device_memory: int | str, plan: ParallelPlan | None = None, decimal: bool = False
) -> None:
    """Raise `DeviceMemoryError` naming the first part of ``b`` (per device) that does not fit in
    ``device_memory``: the weights alone, then the weights with the optimizer states and weight copies (resident
    for the whole run), then the step's peak (activations, gradients, communication buffers)."""
    from .report import format_bytes

    cap = parse_memory_size(device_memory)
    if b.total <= cap:
        return
    plan = plan or (ParallelPlan.from_dict(b.details["parallel"]) if "parallel" in b.details else None)
    where = plan.describe() if plan is not None else "one device"
    size = lambda n: format_bytes(n, decimal)  # noqa: E731
    overhead = f"{size(b.overhead)} runtime overhead"
    states = b.weights + b.weight_copies + b.optimizer_states
    if b.overhead + b.weights > cap:
        stage = "weights"
        what = (
            f"weights alone ({size(b.weights)} per device, {size(b.overhead + b.weights)} with the {overhead}) "
            f"exceed the {size(cap)} device"
        )
    elif b.overhead + states > cap:
        stage = "states"
        parts = [("weights", b.weights), ("weight copies", b.weight_copies), ("optimizer states", b.optimizer_states)]
        terms = " + ".join(f"{name} {size(v)}" for name, v in parts if v)
        what = (
            f"{terms} = {size(states)} per device ({size(b.overhead + states)} with the {overhead}) exceed the "
            f"{size(cap)} device"
        )
    else:
        stage = "peak"
        rest = {
            "activations": b.activations,
            "logits / loss buffers": b.logits,
            "gradients": b.gradients,
            "communication buffers": b.communication,
            "KV cache": b.kv_cache,
            "workspace": b.workspace,
        }
        largest = max(rest, key=rest.get)
        what = (
            f"the step's peak ({size(b.total)} per device with the {overhead}) exceeds the {size(cap)} device, "
            f"though weights and optimizer states fit ({size(b.overhead + states)}); its largest other term: "
            f"{largest} ({size(rest[largest])})"
        )
    raise DeviceMemoryError(f"{where}: {what}; try {', '.join(_suggestions(stage, plan, b))}")


__all__ = [
    "DDP_STRATEGIES",
    "FSDP_STRATEGIES",
    "PARAM_SHARDED",
    "STRATEGIES",
    "DeviceMemoryError",
    "ParallelPlan",
    "check_fits",
    "estimate_parallel",
    "parse_memory_size",
    "tp_config",
]
