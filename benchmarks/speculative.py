"""Speculative decoding on the bundled SmolLM2-135M (CPU): every draft kind, measured in one run.

    PYTHONPATH=. python benchmarks/speculative.py [--prompts 20] [--new-tokens 32] \
        [--distilled /path/to/distilled/draft] [--threads 2]

For each draft: greedy identity with plain greedy over every prompt (batch 1, and batch 4 left-padded
against each row's own single-row output), acceptance rate, target forward passes per generated token,
wall-clock (sum over prompts, batch 1) and the speedup over plain greedy; beside it transformers'
assisted generation with the same draft (``assistant_model=``, ``assistant_early_exit=`` or
``prompt_lookup_num_tokens=``) on the same prompts. Prompts: the first ``--prompt-tokens`` tokens of
KJV passages from the evaluation slice. Writes ``benchmarks/results/speculative.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_efficiency import SpeculativeConfig  # noqa: E402
from hf_efficiency.demo import KJV_SPLITS, bundled_model_path, kjv_passages  # noqa: E402
from hf_efficiency.speculative.drafts import draft_model_for  # noqa: E402
from hf_efficiency.speculative.slots import left_pad  # noqa: E402

RESULTS = Path(ROOT) / "benchmarks" / "results"


def prompts_from_kjv(tok, n: int, length: int) -> list[torch.Tensor]:
    lo, hi = KJV_SPLITS["evaluation"]
    out = []
    for passage in kjv_passages()[lo:hi]:
        ids = tok(passage, return_tensors="pt").input_ids[0]
        if ids.numel() >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} KJV passages have {length} tokens")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def hf_assisted_kwargs(kind: str, draft_model) -> dict | None:
    if kind == "ngram":
        return {"prompt_lookup_num_tokens": 4}
    if kind.startswith("early-exit:"):
        return {"assistant_early_exit": int(kind.split(":")[1])}
    return {"assistant_model": draft_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hf-prompts", type=int, default=5, help="prompts timed with transformers' assisted decoding")
    parser.add_argument("--drafts", default="ngram,early-exit:20,bfloat16,int8,int4,int4@constant4")
    parser.add_argument("--distilled", default=None, help="folder of a draft distilled from the target")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = prompts_from_kjv(tok, args.prompts, args.prompt_tokens)
    new = args.new_tokens
    greedy = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}

    singles, plain_s = [], []
    for p in prompts:
        out, secs = timed(lambda p=p: target.generate(p[None], **greedy))
        singles.append(out[0, p.numel() :])
        plain_s.append(secs)
    batches = [prompts[i : i + 4] for i in range(0, len(prompts), 4)]
    padded = [left_pad(b, tok.pad_token_id or 0) for b in batches]
    plain_b = sum(
        timed(lambda ids=ids, mask=mask: target.generate(ids, attention_mask=mask, **greedy))[1] for ids, mask in padded
    )
    plain_total = sum(plain_s)
    hf_n = min(args.hf_prompts, len(prompts))
    rows = [
        {
            "draft": "none (plain greedy)",
            "identical_b1": f"{len(prompts)}/{len(prompts)}",
            "identical_b4": "-",
            "acceptance": "-",
            "passes_per_token": 1.0,
            "seconds_b1": round(plain_total, 2),
            "speedup_b1": 1.0,
            "seconds_b4": round(plain_b, 2),
            "speedup_b4": 1.0,
            "hf_assisted_speedup": "-",
        }
    ]
    kinds = [k for k in args.drafts.split(",") if k]
    if args.distilled:
        kinds.append(f"distilled={args.distilled}")
    for entry in kinds:
        kind, _, schedule = entry.partition("@")
        label = entry
        spec = (
            SpeculativeConfig(num_draft_tokens=int(schedule.removeprefix("constant")), schedule="constant")
            if schedule.startswith("constant")
            else SpeculativeConfig()
        )
        if kind.startswith("distilled="):
            draft = AutoModelForCausalLM.from_pretrained(kind.split("=", 1)[1], dtype=torch.float32).eval()
            label = f"distilled ({draft.config.num_hidden_layers} layers)"
        elif kind == "ngram" or kind.startswith("early-exit"):
            draft = kind
        else:
            draft = draft_model_for(target, kind)
        same1 = same4 = 0
        drafted = accepted = row_passes = tokens = 0
        secs1 = []
        for p, ref in zip(prompts, singles):
            res, secs = timed(
                lambda p=p: target.generate(
                    p[None], draft_model=draft, speculative=spec, return_dict_in_generate=True, **greedy
                )
            )
            out, s = res.sequences, res.speculative_stats
            same1 += bool(torch.equal(out[0, p.numel() :], ref))
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
            row_passes, tokens = row_passes + s.row_passes, tokens + s.new_tokens
            secs1.append(secs)
        secs4 = 0.0
        for i, (b, (ids, mask)) in enumerate(zip(batches, padded)):
            out, secs = timed(
                lambda ids=ids, mask=mask: target.generate(
                    ids, attention_mask=mask, draft_model=draft, speculative=spec, **greedy
                )
            )
            secs4 += secs
            same4 += sum(bool(torch.equal(out[r, ids.shape[1] :], singles[4 * i + r])) for r in range(len(b)))
        hf_speed = "-"
        hf_kwargs = hf_assisted_kwargs(kind, draft if not isinstance(draft, str) else None)
        if hf_kwargs is not None and not schedule:
            hf_secs = sum(timed(lambda p=p: target.generate(p[None], **hf_kwargs, **greedy))[1] for p in prompts[:hf_n])
            hf_speed = round(sum(plain_s[:hf_n]) / hf_secs, 3)
        total1 = sum(secs1)
        rows.append(
            {
                "draft": label,
                "identical_b1": f"{same1}/{len(prompts)}",
                "identical_b4": f"{same4}/{len(prompts)}",
                "acceptance": round(accepted / max(drafted, 1), 3),
                "passes_per_token": round(row_passes / max(tokens, 1), 3),
                "seconds_b1": round(total1, 2),
                "speedup_b1": round(plain_total / total1, 3),
                "seconds_b4": round(secs4, 2),
                "speedup_b4": round(plain_b / secs4, 3),
                "ours_speedup_on_hf_prompts": round(sum(plain_s[:hf_n]) / sum(secs1[:hf_n]), 3),
                "hf_assisted_speedup": hf_speed,
            }
        )
        print(rows[-1], flush=True)
        if not isinstance(draft, str):
            del draft

    header = (
        f"SmolLM2-135M fp32 target on {args.threads} CPU threads, greedy, {len(prompts)} KJV prompts of "
        f"{args.prompt_tokens} tokens, {new} new tokens each; batch 4 = the same prompts left-padded in "
        f"groups of 4. Speedups are wall-clock against plain greedy in the same run; transformers' assisted "
        f"generation was timed on the first {hf_n} prompts (our speedup on those prompts beside it)."
    )
    keys = list(rows[1].keys()) if len(rows) > 1 else list(rows[0].keys())
    md = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.md").write_text("\n".join(md) + "\n")
    (out / "speculative.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
