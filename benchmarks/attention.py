"""Attention implementations and KV caches on the bundled SmolLM2-135M (CPU): error, memory, time.

    PYTHONPATH=. python benchmarks/attention.py [--parts error,memory,decode]

Three tables, each re-run only when named in ``--parts`` (the others are kept from the previous
``benchmarks/results/attention.json``); all are written to ``benchmarks/results/attention.{md,json}``:

* ``error``: one KJV evaluation window of each ``--error-lengths`` length, one forward (no cache) per
  implementation: perplexity, its change against sdpa, the largest logit difference against sdpa's
  logits of the same window, and milliseconds per token. The block-wise implementation is forced onto
  its block-wise path (``HF_EFFICIENCY_ATTENTION_PATH=blockwise``) so the exact algorithm itself is
  measured, not the sdpa kernel it dispatches to by default.
* ``memory``: one prefill of each ``--memory-lengths`` length (batch 1, no cache, logits of the last
  position only): peak resident memory above the loaded model, and seconds.
* ``decode``: a context of each ``--decode-lengths`` length is prefilled once (sdpa), its keys and values
  are copied into each cache (float32 ``DynamicCache``, int8 and int4 `QuantizedKVCache`), and
  ``--decode-steps`` single tokens are decoded through it by each implementation: median milliseconds
  per token and the cache's size at that context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from hf_efficiency.attention import QuantizedKVCache, cache_nbytes  # noqa: E402
from hf_efficiency.data import load_text, token_windows  # noqa: E402
from hf_efficiency.demo import bundled_model_path  # noqa: E402

OUT = Path(ROOT) / "benchmarks" / "results"
LOWRANK = "hf_efficiency_lowrank"
#: (attn_implementation, lowrank landmarks/window or None, forced HF_EFFICIENCY_ATTENTION_PATH or None)
ERROR_SETTINGS = [
    ("sdpa", None, None),
    ("eager", None, None),
    ("hf_efficiency_blockwise", None, "blockwise"),
    (LOWRANK, (32, 128), None),
    (LOWRANK, (64, 256), None),
    (LOWRANK, (128, 512), None),
]
MEMORY_SETTINGS = [
    ("eager", None, None),
    ("sdpa", None, None),
    ("hf_efficiency_blockwise", None, "blockwise"),
    (LOWRANK, (64, 256), None),
]
DECODE_SETTINGS = [("sdpa", None), ("eager", None), ("hf_efficiency_blockwise", "blockwise")]
DECODE_CACHES = {"float32": None, "int8 g64": (8, 64), "int4 g32": (4, 32)}


def label(impl: str, lowrank: tuple[int, int] | None, forced: str | None) -> str:
    return impl + (" (block-wise path)" if forced else "") + (f" ({lowrank[0]}, {lowrank[1]})" if lowrank else "")


def load(path: str, impl: str, lowrank: tuple[int, int] | None = None):
    kwargs = {}
    if lowrank is not None:
        kwargs["efficiency_config"] = {"attention": {"lowrank_landmarks": lowrank[0], "lowrank_window": lowrank[1]}}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl, **kwargs).eval()


class forced_path:
    """``HF_EFFICIENCY_ATTENTION_PATH`` set for the duration of a ``with`` block (nothing when ``None``)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def __enter__(self) -> None:
        if self.path:
            os.environ["HF_EFFICIENCY_ATTENTION_PATH"] = self.path

    def __exit__(self, *exc) -> None:
        os.environ.pop("HF_EFFICIENCY_ATTENTION_PATH", None)


def error_table(path: str, tok, lengths: list[int]) -> list[dict]:
    text = load_text("kjv", "evaluation")
    windows = {n: token_windows(tok, text, n, n)[0:1] for n in lengths}
    reference: dict[int, torch.Tensor] = {}
    rows = []
    for impl, lowrank, forced in ERROR_SETTINGS:
        model = load(path, impl, lowrank)
        row = {"attention": label(impl, lowrank, forced)}
        for n, ids in windows.items():
            with forced_path(forced), torch.no_grad():
                start = time.perf_counter()
                logits = model(ids, use_cache=False).logits[0, :-1]
                secs = time.perf_counter() - start
            ppl = math.exp(float(F.cross_entropy(logits, ids[0, 1:])))
            if impl == "sdpa":
                reference[n] = logits
            row[f"{n} ppl"] = round(ppl, 4)
            row[f"{n} max dlogit"] = f"{float((logits - reference[n]).abs().max()):.1e}"
            row[f"{n} ms/token"] = round(1000 * secs / n, 2)
            print(row["attention"], n, row[f"{n} ppl"], row[f"{n} max dlogit"], row[f"{n} ms/token"], flush=True)
            del logits
        rows.append(row)
        del model
    for row in rows:
        for n in lengths:
            base = rows[0][f"{n} ppl"]
            row[f"{n} vs sdpa"] = f"{100 * (row[f'{n} ppl'] / base - 1):+.2f}%"
    return rows


def memory_table(path: str, lengths: list[int]) -> list[dict]:
    from hf_efficiency.memory.measure import peak_memory_of

    rows = []
    for impl, lowrank, forced in MEMORY_SETTINGS:
        model = load(path, impl, lowrank)
        row = {"attention": label(impl, lowrank, forced)}
        with forced_path(forced):
            with torch.no_grad():  # warm-up: one-time allocations (thread pools, workspaces) stay out of the peaks
                model(torch.zeros(1, lengths[0], dtype=torch.long), use_cache=False, logits_to_keep=1)
            for n in lengths:
                ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))

                def run(ids=ids, model=model):
                    with torch.no_grad():
                        return model(ids, use_cache=False, logits_to_keep=1).logits

                _, peak, secs = peak_memory_of(run)
                row[f"{n} MiB"], row[f"{n} s"] = round(peak / 2**20), round(secs, 1)
                print(row["attention"], n, row[f"{n} MiB"], row[f"{n} s"], flush=True)
        rows.append(row)
        del model
    return rows


def copy_cache(source: DynamicCache, spec: tuple[int, int] | None):
    """``source``'s keys and values in a new float32 `DynamicCache` (``spec`` None) or `QuantizedKVCache(*spec)`."""
    cache = DynamicCache() if spec is None else QuantizedKVCache(*spec)
    for i, layer in enumerate(source.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return cache


def decode_table(path: str, tok, lengths: list[int], steps: int) -> list[dict]:
    model = load(path, "sdpa", (64, 256))
    text = load_text("kjv", "evaluation")
    rows = []
    for n in lengths:
        ids = token_windows(tok, text, n, n)[0:1]
        prefill = DynamicCache()
        with torch.no_grad():
            model(ids, cache=prefill)
        for cache_name, spec in DECODE_CACHES.items():
            cache = copy_cache(prefill, spec)
            row = {"context": n, "cache": cache_name, "cache MiB": round(cache_nbytes(cache) / 2**20, 1)}
            for impl, forced in DECODE_SETTINGS + [(LOWRANK, None)]:
                model.set_attn_implementation(impl)
                times = []
                token = ids[:, -1:]
                with forced_path(forced), torch.no_grad():
                    for step in range(steps + 1):  # the first step is a warm-up
                        start = time.perf_counter()
                        logits = model(token, cache=cache, position_ids=torch.tensor([[n + step]])).logits
                        times.append(time.perf_counter() - start)
                        token = logits[:, -1:].argmax(-1)
                cache.crop(-(steps + 1))
                name = {"hf_efficiency_blockwise": "blockwise path", LOWRANK: "lowrank (64, 256)"}.get(impl, impl)
                row[name] = round(1000 * statistics.median(times[1:]), 1)
            print(row, flush=True)
            rows.append(row)
        del prefill
    model.set_attn_implementation("sdpa")
    return rows


def markdown(results: dict) -> str:
    md = []
    if "error" in results:
        lengths = results["error"]["lengths"]
        keys = ["attention"] + [f"{n} {c}" for n in lengths for c in ("ppl", "vs sdpa", "max dlogit", "ms/token")]
        md += [
            (
                "Error and time: SmolLM2-135M fp32, one KJV evaluation window of each length, one forward (no "
                "cache), 2 CPU threads. max dlogit: largest absolute logit difference against sdpa on that window."
            ),
            "",
            table(keys, results["error"]["rows"]),
        ]
    if "memory" in results:
        lengths = results["memory"]["lengths"]
        keys = ["attention"] + [f"{n} MiB" for n in lengths] + [f"{n} s" for n in lengths]
        md += [
            "",
            (
                "Prefill of one sequence (no cache, last-position logits), 2 CPU threads: peak resident memory "
                "above the loaded model, MiB, and seconds."
            ),
            "",
            table(keys, results["memory"]["rows"]),
        ]
    if "decode" in results:
        rows = results["decode"]["rows"]
        keys = list(rows[0])
        md += [
            "",
            (
                f"Decoding: milliseconds per token per attention implementation (median of "
                f"{results['decode']['steps']} greedy steps after a warm-up) with a prefilled context of each "
                "length in each cache, and the cache's size at that context, 2 CPU threads."
            ),
            "",
            table(keys, rows),
        ]
    return "\n".join(md).strip() + "\n"


def table(keys: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="error,memory,decode", help="comma-separated: error, memory, decode")
    parser.add_argument("--error-lengths", default="2048,4096,8192")
    parser.add_argument("--memory-lengths", default="1024,2048,4096,8192")
    parser.add_argument("--decode-lengths", default="1024,4096,8192")
    parser.add_argument("--decode-steps", type=int, default=8)
    args = parser.parse_args()
    parts = {p for p in args.parts.split(",") if p}
    unknown = parts - {"error", "memory", "decode"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; allowed: error, memory, decode")
    torch.set_num_threads(2)
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    previous = OUT / "attention.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    results = {k: v for k, v in results.items() if k in ("error", "memory", "decode")}  # older layouts dropped
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if "error" in parts:
        lengths = ints(args.error_lengths)
        results["error"] = {"lengths": lengths, "rows": error_table(path, tok, lengths)}
    if "memory" in parts:
        lengths = ints(args.memory_lengths)
        results["memory"] = {"lengths": lengths, "rows": memory_table(path, lengths)}
    if "decode" in parts:
        results["decode"] = {
            "lengths": ints(args.decode_lengths),
            "steps": args.decode_steps,
            "rows": decode_table(path, tok, ints(args.decode_lengths), args.decode_steps),
        }
    (OUT / "attention.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (OUT / "attention.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
