"""Our decoding of a GGUF file against llama.cpp's on the same file, in one run on this CPU.

    PYTHONPATH=. python benchmarks/llama_cpp_compare.py [--gguf FILE] [--llama-python .venv-llama/bin/python]
        [--prompt-tokens 32] [--new-tokens 64] [--runs 3] [--threads 2]

What ``llama-bench -p 32 -n 64 -t 2`` measures, timed the same way on both sides: prompt processing tokens/s (a
32-token prompt in one pass) and generation tokens/s (64 greedy single-token steps after it, prefill excluded).
llama.cpp runs through llama-cpp-python (``--llama-python``: an interpreter that has it, see
../shared/reference/engines.md; ``-t`` threads, its own kernels); ours are `hf_efficiency.load_gguf` (the file's
bits kept) eager and with a compiled decode step (`compiled_generate_kwargs`), and transformers' float32 load of
the same file. Default file: the bundled SmolLM2-135M-Instruct Q4_1 GGUF. Writes
``benchmarks/results/llama_cpp_compare.{md,json}`` (``--tag`` names the pair of files, for a second file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_efficiency  # noqa: F401
from hf_efficiency import compiled_generate_kwargs, load_gguf
from hf_efficiency.demo import bundled_gguf_path

LLAMA_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, n_prompt, n_gen, runs, threads = sys.argv[1], *map(int, sys.argv[2:6])
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_prompt + n_gen + 8,
                n_batch=512, logits_all=True, verbose=False)
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(n_prompt)]
    pp, tg, tokens = [], [], None
    for r in range(runs + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        mid = time.perf_counter()
        out = []
        for _ in range(n_gen):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        end = time.perf_counter()
        if r:  # the first run warms up
            pp.append(n_prompt / (mid - start))
            tg.append(n_gen / (end - mid))
        tokens = out
    print(json.dumps({"prompt_tps": statistics.median(pp), "gen_tps": statistics.median(tg), "tokens": tokens}))
    """
)


def llama_cpp(python: str, path: str, n_prompt: int, n_gen: int, runs: int, threads: int) -> dict:
    r = subprocess.run(
        [python, "-c", LLAMA_SCRIPT, path, str(n_prompt), str(n_gen), str(runs), str(threads)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours(model, n_prompt: int, n_gen: int, runs: int, compiled: bool) -> dict:
    """Prompt tokens/s (one forward of the prompt) and generation tokens/s (greedy steps after it), the way
    llama-bench separates them: generate(n_gen) minus generate(1) time, per extra token."""
    prompt = torch.tensor([[(7 * i + 11) % 1000 + 100 for i in range(n_prompt)]])
    extra = compiled_generate_kwargs() if compiled else {}
    if compiled:
        torch._dynamo.reset()

    def gen(n):
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
        return time.perf_counter() - start, out

    start = time.perf_counter()
    gen(n_gen)  # warm-up (the compile, for the compiled row)
    warm = time.perf_counter() - start
    pp, tg, tokens = [], [], None
    for _ in range(runs):
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            start = time.perf_counter()
            model(prompt, past_key_values=cache, use_cache=True)
            pp.append(n_prompt / (time.perf_counter() - start))
        t1, _ = gen(1)
        tn, out = gen(n_gen)
        tg.append((n_gen - 1) / max(tn - t1, 1e-9))
        tokens = out[0, n_prompt:].tolist()
    return {"prompt_tps": statistics.median(pp), "gen_tps": statistics.median(tg), "tokens": tokens, "warmup_s": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON", "/work/.venv-llama/bin/python"))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="llama_cpp_compare", help="results file name (without extension)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.gguf or str(bundled_gguf_path())
    n_p, n_g = args.prompt_tokens, args.new_tokens
    rows = []
    res = llama_cpp(args.llama_python, path, n_p, n_g, args.runs, args.threads)
    rows.append({"engine": "llama.cpp (llama-cpp-python)", **res})
    print(rows[-1] if "error" in res else f"llama.cpp: pp {res['prompt_tps']:.1f} tg {res['gen_tps']:.1f}", flush=True)
    model = load_gguf(path).eval()
    for compiled in (False, True):
        r = ours(model, n_p, n_g, args.runs, compiled)
        rows.append({"engine": f"hf-efficiency load_gguf, {'compiled' if compiled else 'eager'}", **r})
        print(f"{rows[-1]['engine']}: pp {r['prompt_tps']:.1f} tg {r['gen_tps']:.1f}", flush=True)
    del model
    folder, name = os.path.split(path)
    fp = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    r = ours(fp, n_p, n_g, args.runs, False)
    rows.append({"engine": "transformers float32 (its GGUF loader), eager", **r})
    print(f"{rows[-1]['engine']}: pp {r['prompt_tps']:.1f} tg {r['gen_tps']:.1f}", flush=True)
    ref = rows[0].get("gen_tps")
    lines = [
        f"`{name}`, prompt {n_p} tokens, {n_g} generated, {args.threads} threads, median of {args.runs} runs after a "
        f"warm-up; CPU capability {torch.backends.cpu.get_cpu_capability()}. 'vs llama.cpp' divides generation "
        "tokens/s by llama.cpp's. Greedy agreement: leading generated tokens equal to llama.cpp's.",
        "",
        "| engine | prompt tokens/s | generation tokens/s | vs llama.cpp | greedy tokens = llama.cpp |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | error: {r['error']} | | | |")
            continue
        agree = ""
        if ref and "tokens" in rows[0]:
            pairs = list(zip(r["tokens"], rows[0]["tokens"]))
            agree = f"{next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))} of {len(pairs)}"
        ratio = f"{r['gen_tps'] / ref:.2f}x" if ref else "n/a"
        lines.append(f"| {r['engine']} | {r['prompt_tps']:.1f} | {r['gen_tps']:.1f} | {ratio} | {agree} |")
    table = "\n".join(lines)
    print(table)
    out = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(out, f"{args.tag}.md"), "w") as fh:
        fh.write(
            f"# Decoding against llama.cpp\n\n`PYTHONPATH=. python benchmarks/llama_cpp_compare.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        )
    with open(os.path.join(out, f"{args.tag}.json"), "w") as fh:
        json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
