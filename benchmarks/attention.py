"""Attention implementations on the bundled SmolLM2-135M (CPU): perplexity and time per implementation.

    PYTHONPATH=. python benchmarks/attention.py [--length 2048] [--windows 1]

Perplexity over ``--windows`` KJV evaluation windows of ``--length`` tokens (one forward each), and the
wall time of those forwards, for sdpa, eager, hf_efficiency_blockwise and hf_efficiency_lowrank at
several (landmarks, window) settings. Writes ``benchmarks/results/attention.{md,json}``.
(Issue 7 in progress: the peak-memory and per-token-time columns up to 8k tokens come next.)
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
    print("\n".join(md))


if __name__ == "__main__":
    main()
