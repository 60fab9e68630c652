"""``hf-efficiency eval``: perplexity, weight bytes and decode speed of a model."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import add_text_args, evaluate, load

HELP = "perplexity, weight bytes and decode speed of a model"
DESCRIPTION = (
    "Evaluate MODEL with the hf-efficiency harness: perplexity over fixed non-overlapping windows, weight "
    "bytes in memory and on disk, median greedy decode tokens/s, a sample."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model folder or Hub id (default: bundled SmolLM2-135M)")
    add_text_args(p)
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a model folder or Hub id with the shared harness."""
    from ..demo import resolve_model_path

    source = resolve_model_path(args.model)
    model, tokenizer = load(source)
    model_dir = source if os.path.isdir(source) else None
    result = evaluate(model, tokenizer, args, model_dir, speed=not args.no_speed)
    out = result.to_dict()
    out["quantization_config"] = (
        model.config.quantization_config.to_dict() if getattr(model.config, "quantization_config", None) else None
    )
    return out


def print_human(r: dict[str, Any]) -> None:
    print(f"model: {r.get('model')}")
    print(f"perplexity: {r['perplexity']:.4f}  ({r['text_source']}; {r['n_windows']} windows x {r['window']} tokens)")
    b = r["bytes"]
    bpw = b.get("bits_per_weight")
    print(f"weight bytes: {b['total']:,} in memory" + (f", {r['disk_bytes']:,} on disk" if r.get("disk_bytes") else ""))
    if bpw:
        print(f"quantized linears: {b['quantized']:,} bytes, {bpw:.3f} bits/weight stored")
    if r.get("tokens_per_s") is not None:
        print(f"greedy decode: {r['tokens_per_s']:.2f} tokens/s (median of {len(r['decode']['runs'])} runs)")
    if r.get("sample") is not None:
        print(f"sample: {r['sample_prompt']!r} -> {r['sample']!r}")
