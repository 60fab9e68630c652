"""``hf-efficiency export``: write a quantized model in a format serving engines load (vLLM, SGLang, TGI,
llama.cpp, Ollama)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from transformers.utils import logging

from .common import add_out_arguments

logger = logging.get_logger("hf_efficiency.cli")

HELP = "export a quantized model to compressed-tensors, GPTQ, AWQ (vLLM, SGLang, TGI) or GGUF (llama.cpp, Ollama)"
DESCRIPTION = (
    "Load MODEL (a folder saved by hf-efficiency, or a GGUF file / GPTQ / AWQ / compressed-tensors folder, read "
    "keeping its bits) and write it in FORMAT. Every quantized weight is written exactly, or the command stops "
    "naming the module the format cannot hold; --lossy converts such modules instead and reports the measured "
    "change of each."
)
EMBEDDINGS = ("auto", "q8_0", "f16", "f32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export import EXPORT_FORMATS

    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a folder saved by hf-efficiency, or a .gguf file / compressed folder (default: the bundled "
        "SmolLM2-135M Q4_1 GGUF)",
    )
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the format to write")
    add_out_arguments(p)
    p.add_argument(
        "--lossy",
        action="store_true",
        help="convert modules the format cannot hold exactly (measured change reported) instead of failing",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the tensors that stay float (embeddings, norms); default: keep the model's",
    )
    p.add_argument(
        "--embeddings",
        default="auto",
        choices=EMBEDDINGS,
        help="GGUF: type of the token embeddings and a float output head (auto: the smallest type holding "
        "them exactly)",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL when MODEL is a folder")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the export to this Hub repo")


def _load(source: str, gguf_file: str | None):
    """The model and its tokenizer (``None`` when there is none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..formats import detect_format, gguf_tokenizer, load_compressed

    kind = detect_format(source, gguf_file)
    if kind == "gguf":
        model = load_compressed(source, gguf_file, dtype=torch.float32)
        return model, gguf_tokenizer(source, gguf_file)
    if kind is not None:
        model = load_compressed(source, dtype=torch.float32)
    else:
        from ..demo import resolve_model_path

        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        logger.warning(f"{source} has no tokenizer; the export has none either")
        tokenizer = None
    return model, tokenizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and export it."""
    from ..demo import bundled_gguf_path
    from ..evaluate import disk_bytes
    from ..export import export_model
    from ..saving import prepare_output_dir, replaced_output_dir

    source = args.model or str(bundled_gguf_path())
    if args.format != "gguf" and args.embeddings != "auto":
        raise ValueError("--embeddings applies to --format gguf only")
    prepare_output_dir(args.out, args.overwrite)  # before the slow part
    start = time.perf_counter()
    model, tokenizer = _load(source, args.gguf_file)
    options: dict[str, Any] = {"embeddings": args.embeddings} if args.format == "gguf" else {}
    with replaced_output_dir(args.out, args.overwrite) as out:  # the whole folder appears at once
        report = export_model(
            model,
            out,
            args.format,
            lossy=args.lossy,
            tokenizer=tokenizer,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            **options,
        )
    result: dict[str, Any] = {
        "source": source,
        "format": args.format,
        "out": os.path.abspath(args.out),
        "seconds": round(time.perf_counter() - start, 2),
        "disk_bytes": disk_bytes(args.out),
        "report": report.to_dict(),
        "_summary": report.summary(),
    }
    if args.push_to_hub:
        from ..hub.push import push_export

        commit = push_export(model, args.push_to_hub, report)
        result["pushed"] = {"repo_id": args.push_to_hub, "url": str(getattr(commit, "commit_url", commit))}
    return result


def print_human(result: dict[str, Any]) -> None:
    print(result["_summary"])
    print(f"{result['disk_bytes']:,} bytes on disk, {result['seconds']} s")
    engines = result["report"].get("engines") or []
    if engines:
        print(f"loads in: {', '.join(engines)}")
    if "pushed" in result:
        print(f"pushed to {result['pushed']['url']}")
