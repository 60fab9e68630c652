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
    "the standard scenarios, --plot draws them, --measure runs the scenario for real and prints both."
)
#: scenario fields with flags of their own below (the other fields get generated flags)
_STRUCTURED = ("training", "efficiency_config")


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
    return MemoryScenario(**scalars, training=training, efficiency_config=eff)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..demo import resolve_model_path
    from ..memory import estimate_memory, measure_memory, plot_breakdowns, standard_breakdowns

    model = resolve_model_path(args.model)
    scenario = scenario_from_args(args)
    main = estimate_memory(model, scenario, label="requested")
    result: dict[str, Any] = {"model": model, "estimate": main.to_dict(), "_breakdowns": [main]}
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
    if args.measure:
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
