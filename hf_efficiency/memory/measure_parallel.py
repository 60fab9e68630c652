"""``measure_memory_parallel``: run a `MemoryScenario` with a `ParallelPlan` in ``devices`` CPU processes
(gloo) and report each rank's peak memory.

Every rank does what `measure.measure_memory` does in one process: pin glibc's mmap threshold, warm up on a
one-layer copy wrapped the same way (so gloo, DTensor and kernel initialization are not counted), return
freed heap, read the baseline RSS, build the model (same seed on every rank), wrap it, create the optimizer,
reset ``VmHWM`` and run the steps; its peak is ``VmHWM`` minus the baseline. The wrapping is what
`parallel.py` describes:

* ``dp``: ``DistributedDataParallel`` with ``Trainer``'s settings (``gradient_as_bucket_view`` from the plan);
* ``zero1``: the same with ``ZeroRedundancyOptimizer`` over the scenario's optimizer;
* ``zero2`` / ``zero3`` / ``fsdp-full`` / ``fsdp-hybrid``: FSDP2 ``fully_shard`` as accelerate applies it
  (each decoder layer, the untied input embedding, then final norm + lm_head with
  ``reshard_after_forward=False``, then the root), ``reshard_after_forward=False`` for ``zero2``, a
  (replicate, shard) mesh for ``fsdp-hybrid``.

Tensor parallelism and offloading are refused: on CPU there is no separate device memory to offload from.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .measure import (
    MemoryMeasurement,
    PeakMemory,
    build_model,
    make_optimizer,
    one_layer_config,
    pin_mmap_threshold,
    run_steps,
    trim_heap,
)
from .parallel import DDP_STRATEGIES, FSDP_STRATEGIES, ParallelPlan
from .scenarios import MemoryScenario, resolve_dtype
from .shapes import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(s: MemoryScenario, steps: int) -> ParallelPlan:
    plan = s.parallel_plan
    if plan is None or plan.devices < 2:
        raise ValueError(
            f"parallel={s.parallel!r} is not allowed in measure_memory_parallel; allowed values: a ParallelPlan "
            "with devices >= 2 (one device: measure_memory)"
        )
    if s.device_type != "cpu":
        raise ValueError(f"device={s.device!r} cannot be measured in parallel here; allowed values: cpu (gloo)")
    if plan.tp > 1:
        raise ValueError(f"tp={plan.tp} cannot be measured (no Megatron-style layers here); allowed values: 1")
    if plan.offload_optimizer or plan.offload_params:
        raise ValueError(
            "offload_optimizer / offload_params cannot be measured on CPU (host and device memory are the same); "
            "allowed values: False"
        )
    if s.kv_cache_bits is not None:
        raise ValueError(f"kv_cache_bits={s.kv_cache_bits!r} cannot be measured; allowed values: None")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not allowed; allowed values: integers >= 1")
    return plan


def measure_memory_parallel(
    model: Any,
    scenario: MemoryScenario | dict[str, Any] | str | None = None,
    *,
    steps: int = 3,
    pin_allocator: bool = True,
    threads: int = 1,
    **scenario_fields: Any,
) -> list[MemoryMeasurement]:
    """Run the scenario (its ``parallel`` plan, ``devices >= 2``) in that many CPU processes and return one
    `MemoryMeasurement` per rank (peak RSS above that rank's baseline). ``threads``: torch threads per rank."""
    scenario_fields.setdefault("device", "cpu")
    s = MemoryScenario.build(scenario, **scenario_fields)
    plan = _check(s, steps)
    config = load_config(model)
    payload = {
        "config": config.to_dict(),
        "scenario": s.to_dict(),
        "steps": steps,
        "pin_allocator": pin_allocator,
        "threads": threads,
        "port": _free_port(),
    }
    return _launch(plan.devices, payload)


def _launch(world: int, payload: dict[str, Any]) -> list[MemoryMeasurement]:
    """Start one fresh Python process per rank (``python -c``, so the caller's ``__main__`` is never re-imported)
    and collect their results."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "from hf_efficiency.memory.measure_parallel import _rank_main; _rank_main()"
    with tempfile.TemporaryDirectory() as out:
        with open(os.path.join(out, "payload.json"), "w") as fh:
            json.dump(payload, fh)
        procs = []
        for rank in range(world):
            log = open(os.path.join(out, f"rank{rank}.log"), "w")  # noqa: SIM115  (closed below)
            args = [sys.executable, "-c", code, str(rank), str(world), out]
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        errors = []
        for rank, (proc, log) in enumerate(procs):
            proc.wait()
            log.close()
            if proc.returncode != 0:
                with open(log.name) as fh:
                    errors.append(f"rank {rank} exited with {proc.returncode}:\n{fh.read()[-3000:]}")
        if errors:
            raise RuntimeError("parallel measurement failed:\n" + "\n".join(errors))
        results = []
        for rank in range(world):
            with open(os.path.join(out, f"rank{rank}.json")) as fh:
                results.append(MemoryMeasurement(**json.load(fh)))
    return results


# --- one rank ---------------------------------------------------------------------------------
def _layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    from ..families import decoder_layer_prefixes

    return [model.get_submodule(p) for p in decoder_layer_prefixes(model, num_layers)]


def _final_norm(model: nn.Module) -> nn.Module | None:
    """accelerate's ``_find_final_norm``: the last norm among the base model's direct children."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    norms = [m for _, m in base.named_children() if "Norm" in type(m).__name__]
    return norms[-1] if norms else None


def _fully_shard(model: nn.Module, plan: ParallelPlan, num_layers: int) -> nn.Module:
    """FSDP2 as accelerate's ``fsdp2_prepare_model`` applies it to a transformers model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if plan.strategy == "fsdp-hybrid":
        shape = (plan.devices // plan.shard_size, plan.shard_size)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (plan.devices,))
    kwargs = {"mesh": mesh, "reshard_after_forward": plan.strategy != "zero2"}
    for layer in _layers(model, num_layers):
        fully_shard(layer, **kwargs)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    if not tied:
        fully_shard(emb, **kwargs)
    tail = [m for m in (_final_norm(model), *((emb,) if tied else ()), out) if m is not None]
    fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, mesh=mesh)
    return model


def _wrap(model: nn.Module, plan: ParallelPlan, num_layers: int) -> nn.Module:
    if plan.strategy in DDP_STRATEGIES:
        if not any(p.requires_grad for p in model.parameters()):
            return model  # inference: no DDP
        return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=plan.gradient_as_bucket_view)
    assert plan.strategy in FSDP_STRATEGIES
    return _fully_shard(model, plan, num_layers)


_ZERO_OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"fused": True}),
    "adamw_foreach": (torch.optim.AdamW, {"foreach": True}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}


def _optimizer(name: str, params: list[nn.Parameter], plan: ParallelPlan) -> torch.optim.Optimizer:
    if plan.strategy != "zero1":
        return make_optimizer(name, params)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if name not in _ZERO_OPTIMIZERS:
        raise ValueError(
            f"optimizer={name!r} cannot be measured with zero1; allowed values: {', '.join(_ZERO_OPTIMIZERS)}"
        )
    cls, kwargs = _ZERO_OPTIMIZERS[name]
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=1e-5, **kwargs)


def _steps(model: nn.Module, s: MemoryScenario, plan: ParallelPlan, steps: int, peak: PeakMemory | None) -> None:
    """`run_steps` on this rank (one forward for inference), the optimizer the plan shards (`_optimizer`)."""
    run_steps(
        model,
        s.mode,
        batch_size=s.batch_size,
        seq=s.sequence_length,
        new_tokens=0,
        optimizer=s.optimizer,
        steps=steps,
        device=torch.device("cpu"),
        mixed_precision=s.mixed_precision,
        gradient_checkpointing=s.gradient_checkpointing,
        peak=peak,
        build_optimizer=lambda params: _optimizer(s.optimizer, params, plan),
    )


def _rank_main() -> None:
    """Entry point of one rank: ``python -c ... RANK WORLD DIR`` (``DIR/payload.json`` in, ``DIR/rankN.json`` out)."""
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(out, "payload.json")) as fh:
        payload = json.load(fh)
    _worker(rank, world, payload, out)


def _worker(rank: int, world: int, payload: dict[str, Any], out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig

    torch.set_num_threads(payload["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(payload["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pinned = payload["pin_allocator"] and pin_mmap_threshold()
        cfg = dict(payload["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        s = MemoryScenario.from_dict(payload["scenario"])
        plan = s.parallel_plan
        build = dict(
            dtype=resolve_dtype(s.dtype, config),
            efficiency_config=s.efficiency,
            setup=s.training_setup,
            attn_implementation=s.attn_implementation,
        )
        peak = PeakMemory(torch.device("cpu"))
        warm_config = one_layer_config(config)
        warm = _wrap(build_model(warm_config, **build), plan, warm_config.num_hidden_layers)
        _steps(warm, MemoryScenario.build(s, sequence_length=min(s.sequence_length, 16)), plan, 2, None)
        del warm
        trim_heap()
        dist.barrier()
        baseline = peak.current()
        start = time.perf_counter()
        torch.manual_seed(0)
        model = _wrap(build_model(config, **build), plan, config.num_hidden_layers)
        trim_heap()
        resident = peak.current() - baseline
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _steps(model, s, plan, payload["steps"], peak)
        top = peak.peak() - baseline
        seconds = time.perf_counter() - start
        record = {**s.to_dict(), "steps": payload["steps"], "rank": rank, "world_size": world}
        result = MemoryMeasurement(
            device="cpu",
            method="rss_vmhwm_pinned" if pinned else "rss_vmhwm",
            peak_bytes=top,
            resident_after_setup=resident,
            baseline_bytes=baseline,
            seconds=seconds,
            scenario=record,
            trainable_parameters=trainable,
        )
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(asdict(result), fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


__all__ = ["measure_memory_parallel"]
