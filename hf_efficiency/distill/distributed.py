"""What the distillation trainers need beyond ``Trainer`` when training runs in several processes.

DDP (and FSDP) synchronize the gradients of the wrapped model only. The learned feature projections of
``DistillationTrainer`` live outside the model, and the running losses of ``MutualDistillationTrainer``
and the loss components both trainers log are kept per process; the helpers here average them across
processes with ``torch.distributed`` (no-ops in a single process). It also holds the checks of parallel
setups the trainers cannot run as asked (FSDP requests accelerate ignores on the CPU, DeepSpeed with
learned projections, tied embeddings sharded at load time) and the DeepSpeed engine that runs a teacher
ZeRO-3 partitioned when it was loaded. See docs/distributed-training.md.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


def world_size() -> int:
    """Number of processes in the default process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from process ``src`` to every process (what DDP does for
    the model when it wraps it), so modules kept outside the model start identical everywhere."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace the gradient of every trainable parameter in ``params`` by its mean over all processes, as
    DDP does for the model's: one all-reduce of the flattened gradients. A parameter without a gradient
    counts as a zero gradient (every process then reduces the same shapes) and gets the mean."""
    params = _trainable(params)
    n = world_size()
    if n == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        mean = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
        if p.grad is None:
            p.grad = mean
        else:
            p.grad.copy_(mean)


def clip_with_extra_parameters(
    model_params: Iterable[nn.Parameter], extra: Iterable[nn.Parameter], model_norm: torch.Tensor, max_norm: float
) -> torch.Tensor:
    """Clip the model's gradients and those of ``extra`` (replicated parameters outside the model) to one
    global norm, as ``clip_grad_norm_`` over all of them would; return that pre-clip norm.

    ``model_norm`` is the norm of the model's gradients over every shard (``Trainer._get_grad_norm``:
    FSDP's sharded gradients are reduced there); ``extra``'s gradients are the same in every process."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    extra = [p for p in extra if p.grad is not None]
    model_params = [p for p in model_params if p.grad is not None]
    model_norm = torch.as_tensor(model_norm, dtype=torch.float32)
    if extra:
        extra_norm = get_total_norm([p.grad for p in extra]).float()
        total = torch.linalg.vector_norm(torch.stack([model_norm.to(extra_norm.device), extra_norm]))
    else:
        total = model_norm
    if max_norm != float("inf"):
        for group in (model_params, extra):  # DTensor and plain gradients apart (one scale factor)
            if group:
                clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device))
    return total


def sum_across_processes(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all processes (a new tensor; ``values`` itself in a single
    process). Put ``values`` on the device the process group communicates on (the CPU for gloo)."""
    out = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitioned ``model``'s parameters (``from_pretrained`` under ``zero.Init``
    once training arguments with a ZeRO-3 config exist): each process then holds a slice of every weight."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def deepspeed_inference_engine(model: nn.Module, accelerator: Any) -> nn.Module:
    """``model`` (a frozen teacher partitioned by ZeRO-3) inside a DeepSpeed engine without an optimizer, whose
    hooks gather each layer's weights for its forward (the teacher stays sharded between forwards)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = {**config.get("zero_optimization", {}), "stage": 3}
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    sized = {  # what transformers fills these "auto" values with for the trained model
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sized.items():
        if zero.get(key) == "auto":
            zero[key] = value
    config["zero_optimization"] = zero
    for key, value in list(config.items()):
        if value == "auto":  # batch sizes and clipping: training bookkeeping the engine only checks
            config[key] = 1
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def loaded_sharded(model: nn.Module) -> bool:
    """True for a model sharded when it was loaded (``from_pretrained(..., distributed_config=...)``: FSDP2
    / tensor parallelism by transformers), which ``Trainer`` trains without wrapping it again."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


def ignored_fsdp_request(trainer: Any) -> str | None:
    """Why an FSDP request (``TrainingArguments(fsdp=...)`` or ``accelerate launch --use_fsdp``) runs as
    something else here, or None. accelerate enables FSDP only for GPU-type devices: processes on the CPU
    (``use_cpu=True``) train as plain DDP, every process holding the whole model."""
    requested = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if not requested or trainer.is_fsdp_enabled or loaded_sharded(trainer.model):
        return None
    kind = str(trainer.accelerator.distributed_type).split(".")[-1]
    return (
        f"FSDP was requested, but accelerate runs this job as {kind} without sharding: accelerate turns FSDP on "
        "only for GPU-type devices, not for processes on the CPU. For FSDP2 on the CPU (gloo), load the student "
        "sharded: AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=N))."
    )


def check_parallel_setup(trainer: Any, has_external_parameters: bool) -> None:
    """Raise for the parallel setups a distillation trainer cannot train correctly and warn for those that
    run other than asked. ``has_external_parameters``: it trains parameters outside the model (learned
    feature projections)."""
    if trainer.is_deepspeed_enabled and has_external_parameters:
        raise ValueError(
            "DeepSpeed cannot train the learned feature projections: they live outside the model the DeepSpeed "
            "engine wraps (its ZeRO optimizer only takes the engine's parameters). Use DDP or FSDP2 "
            "(accelerate launch --multi_gpu, or DistributedConfig), feature_weight=0, or a student as wide as "
            "the teacher (identity projections, not trained)."
        )
    message = ignored_fsdp_request(trainer)
    if message:
        logger.warning(message)
    model = trainer.model
    if loaded_sharded(model) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        logger.warning(
            "The student is sharded at load time (FSDP2) and ties its input and output embeddings: with "
            "transformers 5.25 such a model trained to other weights than in one process (from the second "
            "update on, plain Trainer too); untie them (tie_word_embeddings=False) or train with DDP."
        )
