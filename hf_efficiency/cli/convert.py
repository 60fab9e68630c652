"""``hf-efficiency convert``: read a community compressed checkpoint keeping its bits, save it in our format."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from transformers.utils import logging

from .common import add_out_arguments

logger = logging.get_logger("hf_efficiency.cli")

HELP = "convert a GGUF file or a GPTQ / AWQ / compressed-tensors folder into our format, keeping its bits"
DESCRIPTION = (
    "Read SOURCE (a .gguf file, or a GPTQ, AWQ or compressed-tensors folder) into hf-efficiency's quantized "
    "modules without de-quantizing it, and save a folder that plain from_pretrained loads (after "
    "`import hf_efficiency`): weights, config, tokenizer, generation config, model card."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        nargs="?",
        default=None,
        help="a .gguf file or a compressed folder (default: the bundled SmolLM2-135M Q4_1 GGUF)",
    )
    add_out_arguments(p)
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside SOURCE when SOURCE is a folder")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the tensors that stay float: embeddings, norms (default: float32)",
    )
    p.add_argument(
        "--scale-dtype",
        default=None,
        choices=["float16", "bfloat16"],
        help="GGUF K-quants: round their scales to this dtype (smaller; nearest, error reported) "
        "instead of keeping them exactly in float32",
    )
    p.add_argument(
        "--unsupported",
        default="error",
        choices=["error", "float"],
        help="GGUF tensors in a type we cannot store exactly: fail (default) or keep them float",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Read a community compressed checkpoint keeping its bits and save it in our format."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from ..demo import bundled_gguf_path
    from ..evaluate import disk_bytes, weight_bytes
    from ..formats import detect_format, gguf_tokenizer, load_compressed
    from ..hub.model_card import save_model_card
    from ..integration.checkpoint import check_local_folder
    from ..saving import prepare_output_dir, replaced_output_dir

    prepare_output_dir(args.out, args.overwrite)  # before the slow part
    source = args.source or str(bundled_gguf_path())
    check_local_folder(source, args.gguf_file)
    kind = detect_format(source, args.gguf_file)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if kind == "gguf":
        kwargs.update(scale_dtype=args.scale_dtype, unsupported=args.unsupported, output_loading_info=True)
    elif args.scale_dtype is not None or args.unsupported != "error":
        raise ValueError("--scale-dtype and --unsupported apply to GGUF files only")
    start = time.perf_counter()
    loaded = load_compressed(source, args.gguf_file, **kwargs)
    model, report = loaded if kind == "gguf" else (loaded, None)
    seconds = time.perf_counter() - start
    with replaced_output_dir(args.out, args.overwrite) as out:  # the whole folder appears at once
        model.save_pretrained(out, max_shard_size=args.max_shard_size)
        if kind == "gguf":
            try:
                gguf_tokenizer(source, args.gguf_file).save_pretrained(out)
            except (OSError, ValueError, KeyError) as e:
                logger.warning(
                    f"{source}: transformers could not build a tokenizer from the GGUF metadata ({e}); "
                    "the converted folder has none"
                )
        else:
            try:
                AutoTokenizer.from_pretrained(source).save_pretrained(out)
            except (OSError, ValueError):
                logger.warning(f"{source} has no tokenizer; the converted folder has none either")
            try:
                GenerationConfig.from_pretrained(source).save_pretrained(out)
            except OSError:
                pass
        save_model_card(model, out)
    summary: dict[str, Any] = {
        "source": source,
        "format": kind,
        "out": os.path.abspath(args.out),
        "seconds": round(seconds, 2),
        "bytes": weight_bytes(model),
        "disk_bytes": disk_bytes(args.out),
        "source_bytes": disk_bytes(source)
        if os.path.isdir(source)
        else os.path.getsize(os.path.join(source, args.gguf_file) if args.gguf_file else source),
    }
    if report is not None:
        summary["tensor_types"] = report["types"]
        if report["rounded"]:
            summary["max_relative_rounding_error"] = max(report["rounded"].values())
        if report["float_fallback"]:
            summary["float_fallback"] = report["float_fallback"]
    return summary


def print_human(result: dict[str, Any]) -> None:
    b = result["bytes"]
    print(f"converted {result['source']} ({result['format']}) to {result['out']} in {result['seconds']} s")
    if "tensor_types" in result:
        print("tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(result["tensor_types"].items())))
    print(
        f"quantized linear bytes: {b['quantized']:,} ({b.get('bits_per_weight') or 0:.3f} bits/weight stored); "
        f"model bytes in memory: {b['total']:,}; on disk: {result['disk_bytes']:,} "
        f"(source: {result['source_bytes']:,})"
    )
    if "max_relative_rounding_error" in result:
        print(f"K-quant scales rounded: largest relative weight change {result['max_relative_rounding_error']:.2e}")
    if "float_fallback" in result:
        print(f"kept in float: {', '.join(result['float_fallback'])}")
