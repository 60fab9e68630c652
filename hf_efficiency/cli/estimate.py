"""``hf-efficiency estimate``: predict (and optionally measure) the memory of one `MemoryScenario`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import add_dataclass_arguments, group_size

HELP = "predict (and optionally measure) the memory of inference or training"
DESCRIPTION = (
    "Predict the peak memory of MODEL term by term (runtime overhead, weights, weight copies, gradients, "
    "optimizer states, activations, KV cache, logits, workspace) from its config.json alone, for inference or "
    "for training with full fine-tuning, LoRA, QLoRA, BitFit, adapters or frozen lower layers. --compare adds "
    "the standard scenarios, --plot draws them, --measure runs the scenario for real and prints both. --devices N "
    "with --strategy (dp, zero1, zero2, zero3, fsdp-full, fsdp-hybrid), --tp and --offload-optimizer makes the "
    "estimate per device; --device-memory 80GB checks that it fits and names the term that does not."
)
#: scenario fields with flags of their own below (the other fields get generated flags)
_STRUCTURED = ("training", "efficiency_config", "parallel")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..memory import MemoryScenario
    from ..memory.training import TRAINING_METHODS

    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="local folder or Hub id (only config.json is read); default: bundled SmolLM2-135M",
    )
    add_dataclass_arguments(p, MemoryScenario, skip=_STRUCTURED)
    q = p.add_argument_group("quantization (efficiency_config)")
    q.add_argument(
        "--bits", type=int, choices=(8, 4, 3, 2), default=None, help="quantize the linear layers to this width"
    )
    q.add_argument(
        "--group-size", type=group_size, default=128, help="quantization group size or 'none' (default: 128)"
    )
    q.add_argument("--symmetric", action="store_true", help="symmetric quantization (no minima stored)")
    q.add_argument("--outliers", type=float, default=0.0, help="fraction of weights kept in fp16 (default: 0)")
    t = p.add_argument_group("training method (--mode training)")
    t.add_argument(
        "--training", choices=TRAINING_METHODS, default="full", help="what trains in --mode training (default: full)"
    )
    t.add_argument("--lora-rank", type=int, default=8)
    t.add_argument(
        "--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names, or all-linear"
    )
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--adapter-size", type=int, default=64)
    t.add_argument("--freeze-layers", type=int, default=0)
    _add_parallel_arguments(p)
    p.add_argument("--decimal", action="store_true", help="print GB/MB (powers of 1000) instead of GiB/MiB")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also estimate fp32/bf16/int8/int4 inference and full/LoRA/QLoRA training",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="write a stacked-bar chart of the compared scenarios")
    p.add_argument(
        "--measure", action="store_true", help="run the scenario with random weights and report its measured peak"
    )


def _memory_size(text: str) -> int:
    from ..memory.parallel import parse_memory_size

    try:
        return parse_memory_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    from ..memory.parallel import STRATEGIES

    g = p.add_argument_group("per device (multi-device training and inference)")
    g.add_argument("--devices", type=int, default=None, help="number of devices (default: one)")
    g.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="dp (DDP), zero1 (sharded optimizer), zero2 (+ gradients), zero3 / fsdp-full (+ parameters), "
        "fsdp-hybrid (sharded within --shard-size devices, replicated across); default: dp",
    )
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (Megatron-style; default: 1)")
    g.add_argument("--shard-size", type=int, default=None, help="fsdp-hybrid: devices per shard group (a node)")
    g.add_argument(
        "--offload-optimizer", action="store_true", help="optimizer states and fp32 master copy in host memory"
    )
    g.add_argument("--offload-params", action="store_true", help="zero3 / fsdp: parameter shards in host memory too")
    g.add_argument(
        "--device-memory",
        type=_memory_size,
        default=None,
        metavar="SIZE",
        help="memory of one device (80GB = 80 x 10^9 bytes, 80GiB = 80 x 2^30): fail naming the term that does not fit",
    )


def parallel_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `ParallelPlan` (as a dict) the per-device flags describe, or ``None`` for one device."""
    given = (args.devices, args.strategy, args.tp, args.shard_size)
    if all(v is None for v in given) and not (args.offload_optimizer or args.offload_params):
        return None
    from ..memory.parallel import ParallelPlan

    return ParallelPlan(
        devices=1 if args.devices is None else args.devices,
        strategy=args.strategy or "dp",
        tp=1 if args.tp is None else args.tp,
        shard_size=args.shard_size,
        offload_optimizer=args.offload_optimizer,
        offload_params=args.offload_params,
    ).to_dict()


def scenario_from_args(args: argparse.Namespace):
    """The `MemoryScenario` parsed ``estimate`` arguments describe."""
    import dataclasses

    from ..memory import MemoryScenario

    eff = None
    if args.bits is not None:
        eff = {
            "quantization": {
                "bits": args.bits,
                "group_size": args.group_size,
                "symmetric": args.symmetric,
                "outliers": args.outliers,
            }
        }
    targets = (
        args.lora_targets if args.lora_targets == "all-linear" else tuple(t for t in args.lora_targets.split(",") if t)
    )
    training = {
        "method": args.training,
        "lora_rank": args.lora_rank,
        "lora_targets": targets,
        "lora_dropout": args.lora_dropout,
        "adapter_size": args.adapter_size,
        "freeze_layers": args.freeze_layers,
    }
    scalars = {f.name: getattr(args, f.name) for f in dataclasses.fields(MemoryScenario) if f.name not in _STRUCTURED}
    return MemoryScenario(**scalars, training=training, efficiency_config=eff, parallel=parallel_from_args(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..demo import resolve_model_path
    from ..memory import estimate_memory, measure_memory, plot_breakdowns, standard_breakdowns

    model = resolve_model_path(args.model)
    scenario = scenario_from_args(args)
    main = estimate_memory(model, scenario, label="requested")
    result: dict[str, Any] = {"model": model, "estimate": main.to_dict(), "_breakdowns": [main]}
    if args.device_memory is not None:
        from ..memory.parallel import DeviceMemoryError, check_fits

        try:
            check_fits(main, args.device_memory, decimal=args.decimal)
        except DeviceMemoryError as err:
            raise DeviceMemoryError(f"{err}\n\n{main.table(decimal=args.decimal)}") from None
        result["device_memory"] = args.device_memory
    if args.compare or args.plot:
        others = standard_breakdowns(model, scenario)
        result["compare"] = [b.to_dict() for b in others]
        result["_breakdowns"] += others
    if args.plot:
        result["plot"] = plot_breakdowns(
            result["_breakdowns"][1:],
            args.plot,
            title=f"{os.path.basename(model.rstrip('/'))}: "
            f"batch {scenario.batch_size} x {scenario.sequence_length} tokens on {scenario.device}",
        )
    if args.measure and scenario.parallel is not None:
        from ..memory.measure_parallel import measure_memory_parallel

        ranks = measure_memory_parallel(model, scenario)
        result["measured_per_rank"] = [m.to_dict() for m in ranks]
        result["measured_vs_estimate"] = {
            "estimate_without_overhead": main.total_without_overhead,
            "measured_peak": max(m.peak_bytes for m in ranks),
            "error": main.total_without_overhead / max(m.peak_bytes for m in ranks) - 1,
        }
        result["measured"] = {"method": f"{ranks[0].method}, largest of {len(ranks)} ranks"}
    elif args.measure:
        m = measure_memory(model, scenario, isolate=True)
        result["measured"] = m.to_dict()
        result["measured_vs_estimate"] = {
            "estimate_without_overhead": main.total_without_overhead,
            "measured_peak": m.peak_bytes,
            "error": main.total_without_overhead / m.peak_bytes - 1,
        }
    result["_decimal"] = args.decimal
    return result


def print_human(r: dict[str, Any]) -> None:
    from ..memory import comparison_markdown, format_bytes

    breakdowns = r["_breakdowns"]
    decimal = bool(r.get("_decimal"))
    print(breakdowns[0].table(decimal=decimal))
    if "device_memory" in r:
        print(f"fits in the {format_bytes(r['device_memory'], decimal)} device")
    if "compare" in r:
        print()
        print(comparison_markdown(breakdowns[1:], decimal=decimal))
    if "plot" in r:
        print(f"\nchart: {r['plot']}")
    if "measured" in r:
        mv = r["measured_vs_estimate"]
        print(
            f"\nmeasured peak ({r['measured']['method']}): {format_bytes(mv['measured_peak'], decimal)}; "
            f"estimate without runtime overhead: {format_bytes(mv['estimate_without_overhead'], decimal)} "
            f"({100 * mv['error']:+.1f} %)"
        )
