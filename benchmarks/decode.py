"""End-to-end greedy decoding of SmolLM2-135M-Instruct on this CPU: tokens/s of fp32, bf16 and our
int8 / int4 / int3 / int2 models side by side, in one run.

    PYTHONPATH=. python benchmarks/decode.py [--new-tokens 64] [--runs 5] [--threads 2]

Batch 1, a short prompt, ``max_new_tokens == min_new_tokens`` so every run decodes the same number
of tokens; tokens/s is the median over ``--runs`` runs after one warm-up (prefill included, as a user
sees it). Quantized rows are round-to-nearest (``EfficiencyConfig(quantization=...)``) through the fused
CPU kernel; rows marked "reference path" force ``HF_EFFICIENCY_KERNEL=dequant`` (what the library did
before the kernel). The output head (49152 x 576, a fifth of the weights) is tied to the embeddings and
stays float32 in every row: at int4 it is two thirds of the bytes read per token. Also the number of
leading greedy tokens equal to fp32's (of 32). Writes ``benchmarks/results/decode.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import bundled_model_path
from hf_efficiency.evaluate import weight_bytes

PROMPT = "The King James Bible begins with the book of Genesis. In the beginning"


def q(bits, group, sym=False):
    return EfficiencyConfig(quantization={"bits": bits, "group_size": group, "symmetric": sym})


ROWS = [
    ("fp32", {"dtype": torch.float32}, None),
    ("bf16", {"dtype": torch.bfloat16}, None),
    ("int8 (per channel, symmetric)", {"efficiency_config": q(8, None, True)}, None),
    ("int8, reference path", {"efficiency_config": q(8, None, True)}, "dequant"),
    ("int4 g128", {"efficiency_config": q(4, 128)}, None),
    ("int4 g128, reference path", {"efficiency_config": q(4, 128)}, "dequant"),
    ("int4 g32", {"efficiency_config": q(4, 32)}, None),
    ("int3 g64", {"efficiency_config": q(3, 64)}, None),
    ("int2 g32", {"efficiency_config": q(2, 32)}, None),
    ("fp32 (again, last)", {"dtype": torch.float32}, None),
]


def decode(model, ids, new_tokens: int, runs: int):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times), out[0, ids.shape[1] :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    results, fp_tokens = [], None
    for name, kwargs, kernel in ROWS:
        if kernel:
            os.environ["HF_EFFICIENCY_KERNEL"] = kernel
        else:
            os.environ.pop("HF_EFFICIENCY_KERNEL", None)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        tps, tokens = decode(model, ids, args.new_tokens, args.runs)
        if fp_tokens is None:
            fp_tokens = tokens
        agree = int((tokens[:32] == fp_tokens[:32]).cumprod(0).sum())
        b = weight_bytes(model)
        results.append({"model": name, "tokens_per_s": tps, "weight_mb": b["total"] / 1e6, "agree_with_fp32": agree})
        print(f"{name:<32} {tps:7.2f} tokens/s  {b['total'] / 1e6:7.1f} MB  first {agree}/32 greedy tokens = fp32")
        del model
    os.environ.pop("HF_EFFICIENCY_KERNEL", None)
    # ratios against the faster of the two fp32 runs (first and last): the conservative choice on a noisy machine
    fp = max(results[0]["tokens_per_s"], results[-1]["tokens_per_s"])
    lines = [
        f"SmolLM2-135M-Instruct, batch 1, {ids.shape[1]}-token prompt, {args.new_tokens} new tokens, "
        f"median of {args.runs} runs, {args.threads} threads; 'vs fp32' divides by the faster fp32 run.",
        "",
        "| model | tokens/s | vs fp32 | weights in memory (MB) | greedy tokens equal to fp32 (of 32) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / fp:.2f}x | "
            f"{r['weight_mb']:.1f} | {r['agree_with_fp32']} |"
        )
    table = "\n".join(lines)
    print(table)
    res = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(res, "decode.md"), "w") as fh:
        fh.write(
            "# Greedy decoding speed on this CPU\n\n`PYTHONPATH=. python benchmarks/decode.py "
            + " ".join(sys.argv[1:])
            + "`\n\n"
            + table
            + "\n"
        )
    with open(os.path.join(res, "decode.json"), "w") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
