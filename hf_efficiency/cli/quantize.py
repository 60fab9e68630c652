"""``hf-efficiency quantize``: quantize a model and write a complete model folder."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from .common import add_out_arguments, add_text_args, evaluate, group_size, load, protocol
from .eval import print_human as print_eval
from .methods import add_method_arguments, method_help, method_options, methods_table

HELP = "quantize a model and write a complete model folder"
DESCRIPTION = (
    "Quantize the linear layers of MODEL and save a folder that plain from_pretrained, `hf-efficiency eval` "
    "and push_to_hub take as is (weights, config, tokenizer, generation config, model card)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    methods = methods_table()
    p.add_argument("model", nargs="?", default=None, help="model folder or Hub id (default: bundled SmolLM2-135M)")
    add_out_arguments(p)
    p.add_argument("--method", default="rtn", choices=tuple(methods), help=method_help(methods).replace("%", "%%"))
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 8, 4, 3 or 2 (default: 4)")
    p.add_argument(
        "--group-size", type=group_size, default=128, help="weights per scale, 32-256, or 'none' for per channel"
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", help="absmax scales, no stored minimum")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="scale + minimum (default)")
    p.set_defaults(symmetric=False)
    p.add_argument(
        "--zero-point",
        choices=("float", "integer"),
        default="float",
        help="asymmetric schemes: a float minimum per group (default) or an integer zero point (the "
        "GPTQ/AWQ/compressed-tensors grid: exports to those formats exactly)",
    )
    p.add_argument(
        "--rotation",
        choices=("hadamard", "hadamard-folded"),
        default=None,
        help="rotate the hidden states by random Hadamard matrices first (QuaRot): 'hadamard' also rotates the MLP "
        "down projections' inputs at run time; 'hadamard-folded' only folds rotations into the weights (exportable)",
    )
    p.add_argument("--clip", default="none", help="clip search: none or mse (default: none; see README)")
    p.add_argument("--scale-dtype", default="float16", help="float16, bfloat16 or float32 (default: float16)")
    p.add_argument(
        "--outliers",
        type=float,
        default=0.0,
        help="fraction of weights per row kept in float16, e.g. 0.01 (default: 0)",
    )
    p.add_argument(
        "--module-bits",
        action="append",
        default=None,
        metavar="PATTERN=BITS",
        help="per-module width, e.g. down_proj=8 (repeatable; first match wins)",
    )
    p.add_argument(
        "--target-bits", type=float, default=None, help="automatic mixed precision to this mean code width (calibrated)"
    )
    p.add_argument(
        "--activations", choices=("dynamic", "static"), default=None, help="W8A8: int8 activations (needs --bits 8)"
    )
    p.add_argument("--smoothquant", type=float, default=None, help="W8A8: SmoothQuant migration strength, e.g. 0.5")
    p.add_argument(
        "--calibration-file", default=None, help="calibration text file (default: the bundled KJV calibration slice)"
    )
    p.add_argument("--calibration-samples", type=int, default=None, help="calibration windows (default: 32)")
    p.add_argument("--calibration-length", type=int, default=None, help="tokens per calibration window (default: 512)")
    p.add_argument(
        "--skip",
        action="append",
        default=None,
        metavar="PATTERN",
        help="module name/pattern kept in float (repeatable)",
    )
    p.add_argument(
        "--onload",
        choices=("auto", "sequential", "in-memory"),
        default="auto",
        help="'sequential': read, quantize and write one decoder layer at a time (models larger than memory; "
        "safetensors checkpoints); 'in-memory': load the whole float model; 'auto' (default): sequential when our "
        "memory estimate of the float model exceeds the available memory",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="safetensors shard size (default: 5GB; sequential: one per layer)"
    )
    p.add_argument("--eval", action="store_true", help="also evaluate the result (perplexity, bytes, tokens/s)")
    add_text_args(p)
    add_method_arguments(p, methods)


def _module_bits(items: list[str] | None) -> dict[str, int] | None:
    if not items:
        return None
    out = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise ValueError(f"--module-bits {item!r}: expected PATTERN=BITS, e.g. down_proj=8")
        out[pattern] = int(bits)
    return out


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The EfficiencyConfig sections the `quantize` arguments describe."""
    quantization = {
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": args.symmetric or args.activations is not None,
        "zero_point": args.zero_point,
        "clip": args.clip,
        "scale_dtype": args.scale_dtype,
        "modules_to_not_convert": args.skip,
        "outliers": args.outliers,
        "module_bits": _module_bits(args.module_bits),
        "target_bits": args.target_bits,
        "rotation": args.rotation,
        **method_options(args, methods_table()),
    }
    sections: dict[str, Any] = {"quantization": quantization}
    calibration = {
        k: v
        for k, v in (
            ("dataset", args.calibration_file),
            ("samples", args.calibration_samples),
            ("sequence_length", args.calibration_length),
        )
        if v is not None
    }
    if calibration:
        sections["calibration"] = calibration
    if args.activations is not None or args.smoothquant is not None:
        sections["activations"] = {"mode": args.activations or "dynamic", "smoothquant": args.smoothquant}
    return sections


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, save the complete folder (+ model card), optionally evaluate."""
    from transformers import GenerationConfig

    from ..config import EfficiencyConfig
    from ..demo import resolve_model_path
    from ..evaluate import disk_bytes, weight_bytes
    from ..hub.model_card import save_model_card
    from ..saving import prepare_output_dir, replaced_output_dir

    cfg = EfficiencyConfig(**config_from_args(args))
    prepare_output_dir(args.out, args.overwrite)  # before the slow part
    source = resolve_model_path(args.model)
    sequential = _sequential(args, source, cfg)
    start = time.perf_counter()
    if not sequential:
        model, tokenizer = load(source, efficiency_config=cfg)
        quantize_s = time.perf_counter() - start
    with replaced_output_dir(args.out, args.overwrite) as out:  # the whole folder appears at once
        if sequential:
            from transformers import AutoTokenizer

            from ..integration.sequential import quantize_sequential

            report = quantize_sequential(source, cfg, out)
            model, tokenizer = report.model, AutoTokenizer.from_pretrained(report.source)
            quantize_s = time.perf_counter() - start
        else:
            model.save_pretrained(out, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(out)
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(out)
        except OSError:
            pass
        summary: dict[str, Any] = {
            "source": source,
            "onload": "sequential" if sequential else "in-memory",
            "out": os.path.abspath(args.out),
            "config": model.config.quantization_config.to_dict(),
            "quantize_seconds": round(quantize_s, 2),
            "bytes": weight_bytes(model),
            "disk_bytes": disk_bytes(out),
        }
        metrics = None
        if args.eval:
            if sequential:  # the quantized model fits: evaluate it as saved
                model = load(out)[0]
            result = evaluate(model, tokenizer, args, out)
            summary["eval"] = result.to_dict()
            metrics = {
                "perplexity": result.perplexity,
                "tokens_per_s": result.tokens_per_s,
                "protocol": protocol(result),
            }
            with open(os.path.join(out, "hf_efficiency_eval.json"), "w", encoding="utf-8") as fh:
                json.dump(summary["eval"], fh, indent=2)
        save_model_card(model, out, metrics=metrics)
    return summary


def _sequential(args: argparse.Namespace, source: str, cfg) -> bool:
    """Whether to quantize one layer at a time (``--onload``; ``auto`` asks `should_onload`)."""
    from ..integration.sequential import check_streamable, should_onload

    if args.onload == "in-memory":
        return False
    if args.onload == "sequential":
        check_streamable(cfg)
        return True
    return should_onload(source, cfg)


def print_human(result: dict[str, Any]) -> None:
    b = result["bytes"]
    how = " one decoder layer at a time" if result.get("onload") == "sequential" else ""
    print(f"saved {result['out']} in {result['quantize_seconds']} s (load + quantize{how})")
    print(
        f"quantized linear bytes: {b['quantized']:,} ({b.get('bits_per_weight') or 0:.3f} bits/weight stored); "
        f"model bytes in memory: {b['total']:,}; on disk: {result['disk_bytes']:,}"
    )
    if "eval" in result:
        print_eval(result["eval"])
