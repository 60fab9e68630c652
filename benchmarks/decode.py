"""End-to-end greedy decoding of SmolLM2-135M-Instruct on this CPU: tokens/s of fp32, bf16 and our
int8 / int4 models side by side, in one run, eager and with a compiled decode step, at batch 1, 4 and 16.

    PYTHONPATH=. python benchmarks/decode.py [--new-tokens 64] [--runs 5] [--threads 2] [--quick]

A short prompt, ``max_new_tokens == min_new_tokens`` so every run decodes the same number of tokens; tokens/s is
the median over ``--runs`` runs after one warm-up (prefill included, as a user sees it). Quantized rows are
round-to-nearest (``EfficiencyConfig(quantization=...)``) through the fused CPU kernel. "float head" rows keep
the output head tied to the float32 embeddings (the default); "int8 head" / "int4 head" rows quantize it
(``modules_to_not_convert=[]``, the head untied: its own quantized copy; ``module_bits={"lm_head": 8}`` for an
int8 head under int4 layers). "compiled" rows pass `hf_efficiency.compiled_generate_kwargs()` (static cache,
``torch.compile`` of the decode step; the compile itself happens in the warm-up and is reported apart).
Batch rows decode the prompt repeated ``B`` times, eager; tokens/s counts every sequence.

Columns: tokens/s; the ratio to fp32 in the same mode (eager or compiled, batch 1); weight bytes one token reads
(every linear of the decoder layers and the head); those bytes x tokens/s, and its share of the read bandwidth
measured in the same run (`quant_kernels.bandwidth`); perplexity on 4 KJV evaluation windows of 256 tokens; the
number of leading greedy tokens equal to fp32's (of 32). Writes ``benchmarks/results/decode.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from decode_breakdown import bytes_per_token  # noqa: E402
from quant_kernels import bandwidth  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig, compiled_generate_kwargs
from hf_efficiency.demo import bundled_model_path, kjv_text
from hf_efficiency.evaluate import eval_windows, perplexity

PROMPT = "The King James Bible begins with the book of Genesis. In the beginning"


def q(bits, group, sym=False, head=None):
    spec = {"bits": bits, "group_size": group, "symmetric": sym}
    if head is not None:  # quantize the (tied) head too: untied, its own copy
        spec["modules_to_not_convert"] = []
        if head != bits:
            spec["module_bits"] = {"lm_head": head}
    return EfficiencyConfig(quantization=spec)


FP32 = {"dtype": torch.float32}
INT8 = q(8, None, True)
INT8_HEAD = q(8, None, True, head=8)
INT4 = q(4, 128)
INT4_HEAD8 = q(4, 128, head=8)
INT4_HEAD4 = q(4, 128, head=4)
#: (label, from_pretrained kwargs, compiled, batch sizes); the first batch size is 1
ROWS = [
    ("fp32", FP32, False, (1, 4, 16)),
    ("fp32", FP32, True, (1,)),
    ("bf16", {"dtype": torch.bfloat16}, False, (1,)),
    ("int8 per channel, float head", {"efficiency_config": INT8}, False, (1,)),
    ("int8 per channel, int8 head", {"efficiency_config": INT8_HEAD}, False, (1, 4, 16)),
    ("int8 per channel, int8 head", {"efficiency_config": INT8_HEAD}, True, (1,)),
    ("int4 g128, float head", {"efficiency_config": INT4}, False, (1,)),
    ("int4 g128, int8 head", {"efficiency_config": INT4_HEAD8}, False, (1, 4, 16)),
    ("int4 g128, int8 head", {"efficiency_config": INT4_HEAD8}, True, (1,)),
    ("int4 g128, int4 head", {"efficiency_config": INT4_HEAD4}, False, (1,)),
    ("int4 g128, int4 head", {"efficiency_config": INT4_HEAD4}, True, (1,)),
    ("fp32 (again, last)", FP32, False, (1,)),
]
QUICK = {("fp32", False), ("fp32", True), ("int8 per channel, int8 head", True), ("int4 g128, int8 head", True)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def decode(model, ids, new_tokens: int, runs: int, extra: dict):
    """(tokens/s over all sequences, seconds of the warm-up, the first sequence's new tokens)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
    kwargs["attention_mask"] = torch.ones_like(ids)
    start = time.perf_counter()
    model.generate(ids, **kwargs)  # warm-up (and, compiled, the compile)
    warm = time.perf_counter() - start
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        times.append(time.perf_counter() - start)
    return ids.shape[0] * new_tokens / statistics.median(times), warm, out[0, ids.shape[1] :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only fp32 and the compiled quantized rows, batch 1")
    ap.add_argument("--from-json", action="store_true", help="re-render decode.md from decode.json (no measuring)")
    args = ap.parse_args()
    if args.from_json:
        with open(os.path.join(ROOT, "benchmarks", "results", "decode.json")) as fh:
            saved = json.load(fh)
        write_results(
            saved["results"], saved["read_bandwidth"], saved["prompt_tokens"], argparse.Namespace(**saved["args"])
        )
        return
    torch.set_num_threads(args.threads)
    path = str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    windows = eval_windows(tok, kjv_text("evaluation"), window=256, num_tokens=1024)
    read_bw = bandwidth()
    print(f"read bandwidth {read_bw / 1e9:.1f} GB/s")
    results, fp_tokens = [], None
    for name, kwargs, compiled, batches in ROWS:
        if args.quick and (name, compiled) not in QUICK:
            continue
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        ppl = perplexity(model, windows, progress=False)["perplexity"]
        nbytes = bytes_per_token(model)
        for batch in batches if not args.quick else (1,):
            extra = compiled_generate_kwargs() if compiled else {}
            if compiled:
                torch._dynamo.reset()
            tps, warm, tokens = decode(model, ids.repeat(batch, 1), args.new_tokens, args.runs, extra)
            if fp_tokens is None:
                fp_tokens = tokens
            agree = int((tokens[:32] == fp_tokens[:32]).cumprod(0).sum())
            row = {
                "model": name,
                "mode": "compiled" if compiled else "eager",
                "batch": batch,
                "tokens_per_s": tps,
                "warmup_s": warm,
                "bytes_per_token": nbytes,
                "gb_per_s": nbytes * tps / batch / 1e9,
                "bandwidth_share": nbytes * tps / batch / read_bw,
                "perplexity": ppl,
                "agree_with_fp32": agree,
            }
            results.append(row)
            print(
                f"{name:<30} {row['mode']:<8} b{batch:<3} {tps:7.2f} tok/s  {nbytes / 1e6:6.1f} MB/token  "
                f"{row['gb_per_s']:5.1f} GB/s  ppl {ppl:.3f}  {agree}/32 = fp32  (warm-up {warm:.1f} s)",
                flush=True,
            )
        del model
    write_results(results, read_bw, ids.shape[1], args)


def write_results(results: list[dict], read_bw: float, prompt_tokens: int, args: argparse.Namespace) -> None:
    """Print the table and write ``benchmarks/results/decode.{md,json}``."""
    fp = {}
    for r in results:  # the faster fp32 run per mode and batch: the conservative ratio on a noisy machine
        if r["model"].startswith("fp32"):
            key = (r["mode"], r["batch"])
            fp[key] = max(fp.get(key, 0.0), r["tokens_per_s"])
    lines = [
        f"SmolLM2-135M-Instruct, {prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.runs} "
        f"runs, {args.threads} threads, read bandwidth {read_bw / 1e9:.1f} GB/s (CPU: {cpu_name()}, "
        f"{torch.backends.cpu.get_cpu_capability()}). 'vs fp32' divides by the faster fp32 run of the same mode and "
        "batch size; batch rows count tokens of every sequence (GB/s divides by the batch: one step reads the "
        "weights once for every row).",
        "",
        "| model | mode | batch | tokens/s | vs fp32 | weight MB / token | GB/s | of bandwidth | perplexity | "
        "greedy = fp32 (of 32) | warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        key = (r["mode"], r["batch"])
        ratio = r["tokens_per_s"] / fp[key] if key in fp else float("nan")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['tokens_per_s']:.2f} | {ratio:.2f}x | "
            f"{r['bytes_per_token'] / 1e6:.1f} | {r['gb_per_s']:.1f} | {100 * r['bandwidth_share']:.0f}% | "
            f"{r['perplexity']:.3f} | {r['agree_with_fp32']} | {r['warmup_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    res = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(res, "decode.md"), "w") as fh:
        fh.write(
            "# Greedy decoding speed on this CPU\n\n`PYTHONPATH=. python benchmarks/decode.py "
            + f"--new-tokens {args.new_tokens} --runs {args.runs} --threads {args.threads}"
            + (" --quick" if args.quick else "")
            + "`\n\n"
            + table
            + "\n"
        )
    with open(os.path.join(res, "decode.json"), "w") as fh:
        json.dump(
            {"args": vars(args), "read_bandwidth": read_bw, "prompt_tokens": prompt_tokens, "results": results},
            fh,
            indent=2,
        )


if __name__ == "__main__":
    main()
