"""Per-device memory of multi-device training: our estimate vs the measured peak of each of 2 CPU processes.

    python benchmarks/memory_parallel.py      # writes benchmarks/results/memory_parallel.{md,json}

A Llama-shaped 106M-parameter model with random weights (8 layers x 768, 32k vocabulary, untied), fp32,
fused AdamW, batch 1 x 128 tokens, 3 steps, trained by 2 processes over gloo, each strategy wrapped as
`hf_efficiency/memory/measure_parallel.py` describes (DDP as Trainer wraps it; ZeroRedundancyOptimizer;
FSDP2 ``fully_shard`` as accelerate applies it). Each rank's peak is its resident-set high-water mark
(``VmHWM``) above its own baseline after a one-layer warm-up, glibc's mmap threshold pinned, one torch
thread per rank (`measure_memory_parallel`). The estimate is `estimate_memory(..., parallel=...)` without
the runtime overhead, for ``device="cpu"`` (gloo's all-gather and reduce-scatter go through a full-size
temporary, which the estimate counts on CPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from hf_efficiency.memory import (  # noqa: E402
    comparison_markdown,
    estimate_memory,
    format_bytes,
    measure_memory_parallel,
)

CONFIG = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=32000,
    tie_word_embeddings=False,
)
SCENARIO = dict(batch_size=1, sequence_length=128, device="cpu", optimizer="adamw", dtype="float32")
#: label -> (mode, plan, what runs)
RUNS = {
    "dp": ("training", {"strategy": "dp"}, "DistributedDataParallel"),
    "zero1": ("training", {"strategy": "zero1"}, "DDP + ZeroRedundancyOptimizer"),
    "zero2": ("training", {"strategy": "zero2"}, "FSDP2 fully_shard, reshard_after_forward=False"),
    "zero3 / fsdp-full": ("training", {"strategy": "fsdp-full"}, "FSDP2 fully_shard"),
    "fsdp-hybrid, shard size 1": (
        "training",
        {"strategy": "fsdp-hybrid", "shard_size": 1},
        "FSDP2 on a (2 replicas x 1) mesh",
    ),
    "fsdp-full inference": ("inference", {"strategy": "fsdp-full"}, "FSDP2 fully_shard, one forward"),
}
DEVICES = 2


def run(label: str, steps: int) -> dict:
    mode, plan, what = RUNS[label]
    config = LlamaConfig(**CONFIG)
    kwargs = dict(SCENARIO, mode=mode, parallel={"devices": DEVICES, **plan})
    est = estimate_memory(config, label=label, **kwargs)
    ranks = measure_memory_parallel(config, steps=steps, **kwargs)
    ours = est.total_without_overhead
    return {
        "label": label,
        "runs": what,
        "mode": mode,
        "plan": est.details["parallel"],
        "estimate": ours,
        "breakdown": est.to_dict(),
        "measured": [m.to_dict() for m in ranks],
        "ratio": [ours / m.peak_bytes for m in ranks],
        "_breakdown": est,
    }


def row(r: dict) -> str:
    cells = [f"{format_bytes(m['peak_bytes'])} | **{ratio:.3f}**" for m, ratio in zip(r["measured"], r["ratio"])]
    return f"| {r['label']} | {r['runs']} | {format_bytes(r['estimate'])} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    results = []
    for label in args.only:
        results.append(run(label, args.steps))
        print(row(results[-1]), flush=True)
    n_params = results[0]["breakdown"]["parameters"]
    head = (
        f"Llama-shaped {n_params / 1e6:.0f}M parameters (8 x 768, 32k vocabulary, untied), fp32, fused AdamW, "
        f"batch 1 x 128 tokens, {args.steps} steps; {DEVICES} CPU processes over gloo, one torch thread each "
        f"(torch {torch.__version__}, {platform.machine()}). Ratio = estimate / measured peak of that rank."
    )
    table = "\n".join(
        [
            "| strategy | what runs | estimate per device | rank 0 measured | rank 0 ratio | rank 1 measured "
            "| rank 1 ratio |",
            "|---|---|---:|---:|---:|---:|---:|",
            *[row(r) for r in results],
        ]
    )
    terms = comparison_markdown([r["_breakdown"] for r in results])
    text = (
        head
        + "\n\n"
        + table
        + "\n\nThe estimates term by term (per device, runtime overhead included; the measurement subtracts it as "
        "its baseline):\n\n" + terms + "\n"
    )
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "memory_parallel.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "memory_parallel.json"), "w") as fh:
        data = {
            "config": CONFIG,
            "scenario": SCENARIO,
            "devices": DEVICES,
            "steps": args.steps,
            "torch": torch.__version__,
            "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        }
        json.dump(data, fh, indent=2, default=str)
    print(text)


if __name__ == "__main__":
    main()
