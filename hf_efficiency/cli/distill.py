"""``hf-efficiency distill``: distill a teacher into a smaller student with `run_clm_distill.py`."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "distill a teacher into a smaller student (wraps integrations/run_clm_distill.py)"
DESCRIPTION = (
    HELP + ". Flags after `--` go to the script unchanged (any TrainingArguments / DistillationTrainingArguments flag)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..distill.losses import RESPONSE_LOSSES

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
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then extra run_clm_distill.py flags")


def distill_argv(args: argparse.Namespace) -> list[str]:
    """The ``run_clm_distill.py`` command line for parsed ``distill`` arguments."""
    from ..demo import resolve_model_path

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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .run_clm_distill import main as run_clm_distill

    argv = distill_argv(args)
    metrics = run_clm_distill(argv)
    return {"output_dir": args.output_dir, "argv": argv, **metrics}


def print_human(r: dict[str, Any]) -> None:
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
