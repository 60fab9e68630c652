"""Attention implementations on the bundled SmolLM2-135M (CPU): perplexity and time per implementation.

    PYTHONPATH=. python benchmarks/attention.py [--length 2048] [--windows 1]

Perplexity over ``--windows`` KJV evaluation windows of ``--length`` tokens (one forward each), and the
wall time of those forwards, for sdpa, eager, hf_efficiency_blockwise and hf_efficiency_lowrank at
several (landmarks, window) settings. Writes ``benchmarks/results/attention.{md,json}``.
With ``--memory-lengths``, also one prefill forward of each length (batch 1, no cache, logits of the
last position only) per implementation: peak resident memory above the loaded model and wall time.
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

from hf_efficiency.data import bundled_model_path, load_text, token_windows  # noqa: E402
from hf_efficiency.evaluate import perplexity  # noqa: E402

SETTINGS = [("sdpa", None), ("eager", None), ("hf_efficiency_blockwise", None),
            ("hf_efficiency_lowrank", {"lowrank_landmarks": 32, "lowrank_window": 128}),
            ("hf_efficiency_lowrank", {"lowrank_landmarks": 64, "lowrank_window": 256}),
            ("hf_efficiency_lowrank", {"lowrank_landmarks": 128, "lowrank_window": 512})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--memory-lengths", default="1024,2048,4096,8192",
                        help="comma-separated prefill lengths for the memory/time table ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, load_text("kjv", "evaluation"), args.length, args.length * args.windows)
    rows = []
    for impl, attention in SETTINGS:
        kwargs = {} if attention is None else {"efficiency_config": {"attention": attention}}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl,
                                                     **kwargs).eval()
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch_size=1, progress=False)["perplexity"]
        label = impl if attention is None else (f"{impl} (landmarks {attention['lowrank_landmarks']}, "
                                                f"window {attention['lowrank_window']})")
        rows.append({"attention": label, "perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    base = rows[0]["perplexity"]
    for r in rows:
        r["vs_sdpa"] = f"{100 * (r['perplexity'] / base - 1):+.2f}%"
    keys = ["attention", "perplexity", "vs_sdpa", "seconds"]
    md = [f"SmolLM2-135M fp32, {args.windows} KJV window(s) of {args.length} tokens, one forward each, 2 CPU threads.",
          "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    out = Path(ROOT) / "benchmarks" / "results"
    (out / "attention.md").write_text("\n".join(md) + "\n")
    (out / "attention.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    lengths = [int(x) for x in args.memory_lengths.split(",") if x]
    if lengths:
        mem = memory_table(path, lengths)
        md += ["", f"Prefill of one sequence (no cache, last-position logits), 2 CPU threads: peak resident memory "
               "above the loaded model, MiB, and seconds.", ""]
        keys = ["attention"] + [f"{n} MiB" for n in lengths] + [f"{n} s" for n in lengths]
        md += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        md += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in mem]
        (out / "attention.md").write_text("\n".join(md) + "\n")
        (out / "attention.json").write_text(json.dumps({"settings": vars(args), "rows": rows, "memory": mem}, indent=1))
    print("\n".join(md))


def memory_table(path, lengths: list[int]) -> list[dict]:
    from hf_efficiency.memory.measure import peak_memory_of

    impls = [("eager", None, None), ("sdpa", None, None), ("hf_efficiency_blockwise", None, "blockwise"),
             ("hf_efficiency_lowrank", {"lowrank_landmarks": 64, "lowrank_window": 256}, None)]
    rows = []
    for impl, attention, forced in impls:
        kwargs = {} if attention is None else {"efficiency_config": {"attention": attention}}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl,
                                                     **kwargs).eval()
        label = impl + (" (block-wise path)" if forced else "") + (" (64, 256)" if attention else "")
        row = {"attention": label}
        if forced:
            os.environ["HF_EFFICIENCY_ATTENTION_PATH"] = forced
        with torch.no_grad():  # warm-up: one-time allocations (thread pools, kernel workspaces) stay out of the peaks
            model(torch.zeros(1, lengths[0], dtype=torch.long), use_cache=False, logits_to_keep=1)
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))

            def run(ids=ids):
                with torch.no_grad():
                    return model(ids, use_cache=False, logits_to_keep=1).logits

            _, peak, secs = peak_memory_of(run)
            row[f"{n} MiB"], row[f"{n} s"] = round(peak / 2**20), round(secs, 1)
            print(label, n, row[f"{n} MiB"], row[f"{n} s"], flush=True)
        os.environ.pop("HF_EFFICIENCY_ATTENTION_PATH", None)
        rows.append(row)
        del model
    return rows


if __name__ == "__main__":
    main()
