"""``hf-efficiency generate``: speculative decoding with acceptance, target passes per token and speed."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import load

HELP = "generate with speculative decoding and report acceptance, target passes per token and speed"
DESCRIPTION = (
    HELP + ". With --compare it also runs plain decoding of the same prompt and reports the speedup and whether "
    "the outputs agree."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..config import SpeculativeSpec
    from ..demo import resolve_model_path
    from ..evaluate import DEFAULT_PROMPT

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    spec = SpeculativeSpec(
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        schedule=args.schedule,
        max_draft_tokens=max(args.max_draft_tokens, args.num_draft_tokens),
    )
    path = resolve_model_path(args.model)
    model, tok = load(path, dtype=getattr(torch, args.dtype))
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
    generated = model.generate(**enc, speculative=spec, return_dict_in_generate=True, **gen)
    seconds = time.perf_counter() - start
    out, stats = generated.sequences, generated.speculative_stats
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


def print_human(r: dict[str, Any]) -> None:
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
