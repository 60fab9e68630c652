"""Quantized KV cache on the bundled SmolLM2-135M (CPU): perplexity at 2k context and bytes per token.

    PYTHONPATH=. python benchmarks/kv_cache.py

Each 2048-token window of the KJV evaluation slice is fed in chunks of 256 tokens through the cache, so
every chunk attends to the previous chunks through the cache's stored (quantized) keys and values;
perplexity is over all predicted tokens of two windows. Bytes per token: everything the cache holds
after a window, over its length. Writes ``benchmarks/results/kv_cache.{md,json}``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from hf_efficiency.attention import QuantizedKVCache, cache_nbytes  # noqa: E402
from hf_efficiency.data import load_text, token_windows  # noqa: E402
from hf_efficiency.demo import bundled_model_path  # noqa: E402

WINDOW, CHUNK, WINDOWS = 2048, 256, 2
CACHES = {
    "float32 (DynamicCache)": DynamicCache,
    "int8 g64": lambda: QuantizedKVCache(8, 64),
    "int4 g64": lambda: QuantizedKVCache(4, 64),
    "int4 g32": lambda: QuantizedKVCache(4, 32),
    "int4 g32 + 128 float": lambda: QuantizedKVCache(4, 32, residual_length=128),
    "int2 g32": lambda: QuantizedKVCache(2, 32),
}


def main() -> None:
    torch.set_num_threads(2)
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = token_windows(tok, load_text("kjv", "evaluation"), WINDOW, WINDOW * WINDOWS)
    rows = []
    for name, make in CACHES.items():
        start, nll, n = time.perf_counter(), 0.0, 0
        for w in windows:
            cache = make()
            for s in range(0, w.numel(), CHUNK):
                ids = w[None, s : s + CHUNK]
                with torch.no_grad():
                    logits = model(ids, cache=cache, position_ids=torch.arange(s, s + ids.shape[1])[None]).logits
                target = w[s + 1 : s + CHUNK + 1]
                logp = torch.log_softmax(logits[0, : target.numel()].float(), -1)
                nll -= float(logp.gather(1, target[:, None]).sum())
                n += target.numel()
        rows.append(
            {
                "cache": name,
                "perplexity": round(math.exp(nll / n), 4),
                "bytes_per_token": cache_nbytes(cache) / cache.get_seq_length(),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["perplexity_vs_float"] = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%"
        r["bytes_vs_float32"] = round(r["bytes_per_token"] / base["bytes_per_token"], 3)
        r["bytes_vs_bfloat16"] = round(2 * r["bytes_per_token"] / base["bytes_per_token"], 3)
    keys = [
        "cache",
        "perplexity",
        "perplexity_vs_float",
        "bytes_per_token",
        "bytes_vs_float32",
        "bytes_vs_bfloat16",
        "seconds",
    ]
    md = [
        f"SmolLM2-135M fp32, {WINDOWS} KJV windows of {WINDOW} tokens fed in chunks of {CHUNK} through the cache, "
        "2 CPU threads. bytes_vs_bfloat16 compares with a bfloat16 cache (half the float32 bytes).",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    out = Path(ROOT) / "benchmarks" / "results"
    (out / "kv_cache.md").write_text("\n".join(md) + "\n")
    (out / "kv_cache.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
