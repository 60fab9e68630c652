"""``estimate_memory``: peak memory of inference or training, term by term, from config.json.

The talk's formula is runtime overhead + weights + gradients + optimizer states + activations.
This estimator keeps those terms and adds the ones that decide real peaks: fp32 master or
16-bit autocast weight copies, the KV cache, the loss/logits buffers (``seq x vocab`` in fp32,
often larger than all layer activations of a small model), per-layer working memory, kernel
layout caches of quantized layers, and the optimizer step's temporaries. Gradients and
activations never peak together (backward frees a layer's activations as it creates that
layer's gradients), so the ``overlap`` term subtracts what is not resident at the same time:

* training peak = overhead + weights + copies + optimizer states
  + max(activations + logits + lm_head gradient, gradients + optimizer step workspace)
* inference peak = overhead + weights + KV cache + max(layer workspace, logits)

Every term is reported in a `MemoryBreakdown`; ``total`` is their sum (``overlap`` <= 0). With a
``parallel`` plan the breakdown is per device (`parallel.estimate_parallel`): the terms divided as the
strategy divides them, its ``communication`` buffers, and offloaded state in ``host`` (outside ``total``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import (
    attention_needs_grad,
    checkpointed_layer_bytes,
    head_saved_bytes,
    inference_layer_workspace,
    layer_forward_bytes,
    layer_saved_bytes,
    training_logits_bytes,
)
from .scenarios import (  # noqa: F401  (DEVICE_OVERHEAD_BYTES ... DTYPES: re-exported, they lived here)
    DEVICE_OVERHEAD_BYTES,
    DTYPES,
    KV_CACHE_BITS,
    MIXED_PRECISION,
    MODES,
    OPTIMIZERS,
    MemoryScenario,
    resolve_dtype,
)
from .shapes import (
    build_meta_model,
    load_config,
    model_shape,
    output_embedding_names,
    tensor_bytes,
)
from .training import TrainablePlan, plan_training

#: bitsandbytes keeps 32-bit states for tensors under this many elements and quantizes the
#: others block-wise (one fp32 absmax per 256 values).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256

TERMS = (
    ("overhead", "runtime overhead"),
    ("weights", "weights"),
    ("weight_copies", "weight copies (fp32 master / 16-bit autocast)"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations"),
    ("kv_cache", "KV cache"),
    ("logits", "logits / loss buffers"),
    ("workspace", "workspace"),
    ("communication", "communication buffers"),
    ("overlap", "not resident at the same time"),
)


@dataclass
class MemoryBreakdown:
    """Predicted peak memory, in bytes, term by term (``total`` is the sum of the terms)."""

    mode: str
    device: str
    dtype: str
    batch_size: int
    sequence_length: int
    parameters: int
    trainable_parameters: int
    overhead: int = 0
    weights: int = 0
    weight_copies: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    kv_cache: int = 0
    logits: int = 0
    workspace: int = 0
    communication: int = 0
    overlap: int = 0
    #: host (CPU) memory the strategy offloads to, per device; not part of ``total`` (`parallel.ParallelPlan`)
    host: int = 0
    label: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name, _ in TERMS)

    @property
    def total_without_overhead(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` (or the RSS growth on CPU) should show."""
        return self.total - self.overhead

    def terms(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in TERMS}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        out["total_without_overhead"] = self.total_without_overhead
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self, decimal: bool = False) -> str:
        """A readable breakdown; ``decimal=True`` prints GB/MB (10^9) instead of GiB/MiB."""
        from .report import breakdown_table

        return breakdown_table(self, decimal=decimal)

    def __str__(self) -> str:
        return self.table()


def unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def quantize_structure(model: nn.Module, efficiency_config) -> list[str]:
    from ..quant.modules.replace import modules_to_not_convert, replace_with_quant_linear

    spec = efficiency_config.quantization
    act = getattr(efficiency_config, "activations", None)
    return replace_with_quant_linear(
        model, spec, modules_to_not_convert(model, spec), None if act is None else act.mode
    )


def _weights(
    model: nn.Module, quantized: list[str], spec, device: str, compute: torch.dtype, mode: str
) -> tuple[int, dict[str, int], int]:
    """(resident weight bytes, details, largest quantized matrix in elements)."""
    qnames = set(quantized)
    q_bytes = other = 0
    emb_bytes = 0
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, t in unique_tensors(model):
        b = tensor_bytes(t)
        if name.rpartition(".")[0] in qnames:
            q_bytes += b
        elif emb is not None and t is emb.weight:
            emb_bytes += b
        else:
            other += b
    details: dict[str, int] = {}
    largest = 0
    cache = 0
    if quantized:
        modules = [model.get_submodule(n) for n in quantized]
        largest = max(m.in_features * m.out_features for m in modules)
        if spec.target_bits is not None:  # the allocation needs calibration; estimate at the mean width
            codes = sum(tensor_bytes(m.weight) for m in modules)
            q_bytes += round(codes * (spec.target_bits / spec.bits - 1))
        if mode == "inference":
            cache = sum(m.kernel_layout_nbytes(device, compute) for m in modules)
        details["quantized_linears"] = q_bytes
        if cache:
            details["kernel_layout_caches"] = cache
    details["embeddings"] = emb_bytes
    details["other_float"] = other
    return q_bytes + emb_bytes + other + cache, details, largest


#: config fields of dropout applied inside the layers while training
_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout", "hidden_dropout")


def _dropout_probability(config) -> float:
    """The largest dropout probability the config applies in training (0.0 when none)."""
    values = [getattr(config, name, None) for name in _DROPOUT_FIELDS]
    return max([float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)], default=0.0)


def optimizer_state_bytes(optimizer: str, shapes: list[tuple[int, ...]], state_bytes: int) -> int:
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer in ("adamw", "adamw_foreach", "adam"):
            total += 2 * n * state_bytes
        elif optimizer == "adamw_8bit":
            total += 2 * n * 4 if n < BNB_MIN_8BIT_SIZE else 2 * (n + 4 * math.ceil(n / BNB_BLOCK))
        elif optimizer == "sgd":
            total += n * state_bytes
        elif optimizer == "adafactor":
            total += (shape[0] + math.prod(shape[1:])) * state_bytes if len(shape) >= 2 else n * state_bytes
    return total


def optimizer_step_bytes(optimizer: str, device: str, trainable: int, largest: int, state_bytes: int) -> int:
    """Temporaries of one optimizer step: the fused kernel works in place; ``foreach`` builds
    one full list of ``sqrt(v)``; the per-tensor loop needs about two of the largest tensor."""
    if optimizer == "adamw":
        return 0
    if optimizer == "adamw_foreach" or (optimizer == "adam" and device == "cuda"):
        return trainable * state_bytes
    if optimizer == "adam":
        return 2 * largest * state_bytes
    if optimizer == "sgd":
        return largest * state_bytes
    return 3 * largest * 4  # adamw_8bit dequantizes one tensor's states; adafactor works in fp32


def _trainable_shapes(model: nn.Module, plan: TrainablePlan) -> list[tuple[int, ...]]:
    params = dict(model.named_parameters(remove_duplicate=True))
    return [tuple(params[n].shape) for n in plan.trainable_numels] + list(plan.added_shapes)


def estimate_memory(
    model: Any,
    scenario: MemoryScenario | dict[str, Any] | str | None = None,
    *,
    label: str = "",
    trust_remote_code: bool = False,
    **scenario_fields: Any,
) -> MemoryBreakdown:
    """Predict the peak memory of running ``model`` for inference or training.

    ``model`` is a transformers model, a ``PretrainedConfig``, a config dict, a local folder or
    a Hub id; only the config is read, never the weights. ``scenario`` is a `MemoryScenario` (or
    its dict); its fields may also be given as keyword arguments (``mode``, ``dtype``,
    ``efficiency_config``, ``training``, ``optimizer``, ``batch_size``, ``sequence_length``,
    ``new_tokens``, ``gradient_checkpointing``, ``attn_implementation``, ``mixed_precision``,
    ``kv_cache_bits``, ``kv_group_size``, ``device``, ``overhead_bytes``, ``parallel``), which replace
    the scenario's values; a mode name as second argument is ``mode=``. Inference is one forward over
    ``batch_size x sequence_length`` tokens with the KV cache (all logits, as ``model(...)``
    returns them), or, with ``new_tokens > 0``, ``generate`` of that many tokens (the prompt's
    last-token logits only). Training is one step of ``optimizer`` on ``batch_size`` sequences
    of ``sequence_length`` tokens with the method in ``training`` (a `TrainingSetup`, one of
    ``"full"``, ``"lora"``, ``"qlora"``, ``"bitfit"``, ``"adapters"``, ``"freeze"``, a dict of
    its fields, or a peft ``LoraConfig``). ``efficiency_config`` quantizes the weights exactly
    as ``from_pretrained`` would (its packed layout is what is counted).
    ``device`` picks the runtime overhead (`DEVICE_OVERHEAD_BYTES`, or ``overhead_bytes``) and
    the kernel paths. ``parallel`` (a `parallel.ParallelPlan`, its dict or JSON text) makes the estimate
    per device for data-parallel, ZeRO/FSDP and tensor-parallel runs (see ``docs/memory-per-device.md``).
    Returns a `MemoryBreakdown` whose ``total`` is in bytes.
    """
    s = MemoryScenario.build(scenario, **scenario_fields)
    plan = s.parallel_plan
    if plan is not None and not plan.is_single_device:
        from .parallel import estimate_parallel

        return estimate_parallel(model, s, plan, label=label, trust_remote_code=trust_remote_code)
    return estimate_with_context(model, s, label=label, trust_remote_code=trust_remote_code)[0]


@dataclass
class EstimateContext:
    """What `estimate_memory` worked out besides the breakdown, for the per-device rules (`parallel.py`)."""

    meta: nn.Module
    shape: Any
    pbytes: int
    plan: TrainablePlan | None = None
    added_bytes: int = 0
    state_bytes: int = 0
    master: bool = False
    step_workspace: int = 0
    lm_head_grad: int = 0


def estimate_with_context(
    model: Any, s: MemoryScenario, *, label: str = "", trust_remote_code: bool = False
) -> tuple[MemoryBreakdown, EstimateContext]:
    """The one-device estimate of scenario ``s`` and its `EstimateContext`."""
    mode, optimizer, mixed_precision = s.mode, s.optimizer, s.mixed_precision
    batch_size, seq, new_tokens = s.batch_size, s.sequence_length, s.new_tokens
    attn_implementation, gradient_checkpointing = s.attn_implementation, s.gradient_checkpointing
    kv_cache_bits, kv_group_size = s.kv_cache_bits, s.kv_group_size
    device = s.device_type  # "cuda" for "cuda:1": what picks the kernels

    config = load_config(model, trust_remote_code=trust_remote_code)
    shape = model_shape(config)
    weight_dtype = resolve_dtype(s.dtype, config)
    compute = DTYPES[mixed_precision] if mixed_precision else weight_dtype
    a = torch.empty((), dtype=compute).element_size()
    pbytes = torch.empty((), dtype=weight_dtype).element_size()

    eff = s.efficiency
    spec = eff.quantization if eff is not None else None
    setup = s.training_setup

    meta = build_meta_model(config, weight_dtype, trust_remote_code=trust_remote_code)
    params = sum(t.numel() for _, t in unique_tensors(meta) if isinstance(t, nn.Parameter))
    quantized = quantize_structure(meta, eff) if spec is not None else []
    lm_head_name, tied = output_embedding_names(meta)
    notes: list[str] = []
    if shape.family is None:
        notes.append(
            f"model type {shape.model_type!r} has no family description (hf_efficiency.families): its activations "
            "are estimated with Llama's layer rules (RMSNorm, gated MLP, rotary q/k), so they are approximate"
        )
    dropout = _dropout_probability(config)
    if mode == "training" and dropout:
        notes.append(
            f"the config trains with dropout (p={dropout:g}); the dropout masks inside the layers are not counted"
        )
    weights, details, largest_q = _weights(meta, quantized, spec, device, compute, mode)
    if spec is not None and spec.target_bits is not None:
        notes.append(f"mixed precision: codes estimated at the target mean of {spec.target_bits} bits")
    out = MemoryBreakdown(
        mode=mode,
        device=s.device,
        dtype=str(weight_dtype).replace("torch.", ""),
        batch_size=batch_size,
        sequence_length=seq,
        parameters=params,
        trainable_parameters=0,
        label=label,
        overhead=DEVICE_OVERHEAD_BYTES.get(device, 0) if s.overhead_bytes is None else s.overhead_bytes,
        weights=weights,
        details=details,
        notes=notes,
    )
    # the CPU reference path of quantized layers dequantizes one weight per call
    dequant_ws = 3 * largest_q * 4 if quantized and device != "cuda" else 0

    if mode == "inference":
        context = seq + new_tokens
        kv_bytes = a if kv_cache_bits is None else kv_cache_bits / 8 + 4 / kv_group_size
        out.kv_cache = round(shape.num_layers * 2 * shape.kv_dim * context * batch_size * kv_bytes)
        if kv_cache_bits is not None:
            notes.append(f"KV cache at {kv_cache_bits} bits with an fp16 scale and zero per {kv_group_size} values")
        if new_tokens:
            out.logits = batch_size * shape.vocab_size * (a + 4)  # last position only, plus its fp32 copy
        else:
            out.logits = batch_size * seq * shape.vocab_size * a
        out.workspace = batch_size * inference_layer_workspace(shape, seq, context, a, attn_implementation) + dequant_ws
        out.overlap = max(out.workspace, out.logits) - (out.workspace + out.logits)
        return out, EstimateContext(meta=meta, shape=shape, pbytes=pbytes)

    assert setup is not None
    # CUDA's fused dropout keeps a bool mask; the CPU kernel keeps a mask in the dtype it drops out (0)
    plan = plan_training(meta, shape, setup, lm_head_name, tied, dropout_mask_bytes=1 if device == "cuda" else 0)
    out.trainable_parameters = plan.trainable_parameters
    out.details["training_method"] = setup.method
    added_bytes = 4 if setup.uses_lora or setup.method == "adapters" else pbytes  # peft keeps adapters in fp32
    existing = plan.trainable_parameters - plan.added_parameters
    grad_bytes = existing * pbytes + plan.added_parameters * added_bytes
    out.weights += plan.added_parameters * added_bytes
    out.gradients = grad_bytes
    master = mixed_precision is not None and pbytes == 2
    state_bytes = 4 if master else pbytes
    shapes = _trainable_shapes(meta, plan)
    out.optimizer_states = optimizer_state_bytes(optimizer, shapes, state_bytes)
    if setup.uses_lora or setup.method == "adapters":  # adapter states follow the adapters' fp32
        adapter_shapes = shapes[len(plan.trainable_numels) :]
        out.optimizer_states += optimizer_state_bytes(optimizer, adapter_shapes, 4) - optimizer_state_bytes(
            optimizer, adapter_shapes, state_bytes
        )
    if master:
        out.weight_copies = existing * 4
        notes.append("mixed precision with 16-bit weights: fp32 master copy and fp32 optimizer states")
    elif mixed_precision is not None:
        linear_numel = sum(
            m.weight.numel()
            for _, m in meta.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m.weight.is_floating_point()
        )
        out.weight_copies = linear_numel * 2
        notes.append("autocast over fp32 weights: 16-bit copies of the linear weights live until backward")

    per_seq = 0
    if gradient_checkpointing:
        full = [
            layer_saved_bytes(shape, lt, seq, a, attn_implementation, layer=k, batch=batch_size)
            for k, lt in enumerate(plan.layers)
        ]
        per_seq = sum(checkpointed_layer_bytes(shape, seq, a) for lt in plan.layers if lt.grad_in or lt.trains)
        recomputed = max(full, default=0)  # one layer recomputed at a time during backward
        per_seq += recomputed
        out.details["recomputed_layer_per_sequence"] = recomputed
    else:
        per_seq = sum(
            layer_saved_bytes(shape, lt, seq, a, attn_implementation, layer=k, batch=batch_size)
            for k, lt in enumerate(plan.layers)
        )
    per_seq += head_saved_bytes(
        shape,
        seq,
        a,
        grad=plan.trainable_parameters > 0,
        norm_trainable=plan.final_norm_trainable,
        lm_head_trainable=plan.lm_head_trainable,
        rope_tables=shape.rope_tables(k for k, lt in enumerate(plan.layers) if attention_needs_grad(lt)),
    )
    out.activations = batch_size * per_seq
    # merged LoRA weights of the experts (peft's ParamWrapper): once per forward; with checkpointing only the
    # recomputed layer holds them
    forward = [layer_forward_bytes(lt) for lt in plan.layers]
    out.activations += max(forward, default=0) if gradient_checkpointing else sum(forward)
    out.logits = batch_size * training_logits_bytes(shape, seq, a)
    step_workspace = optimizer_step_bytes(
        optimizer, device, plan.trainable_parameters, plan.largest_trainable, state_bytes
    )
    out.workspace = step_workspace + dequant_ws
    lm_head_grad = shape.vocab_size * shape.hidden_size * pbytes if plan.lm_head_trainable else 0
    peak_backward = out.activations + out.logits + lm_head_grad
    peak_step = out.gradients + out.workspace
    out.overlap = max(peak_backward, peak_step) - (out.activations + out.logits + out.gradients + out.workspace)
    if optimizer == "adamw_8bit":
        notes.append("8-bit AdamW as bitsandbytes stores it (block-wise int8 states, fp32 under 4096 elements)")
    context = EstimateContext(
        meta=meta,
        shape=shape,
        pbytes=pbytes,
        plan=plan,
        added_bytes=added_bytes,
        state_bytes=state_bytes,
        master=master,
        step_workspace=step_workspace,
        lm_head_grad=lm_head_grad,
    )
    return out, context
