"""Where one decoded token's time goes on SmolLM2-135M-Instruct (batch 1, this CPU): the output head, the
decoder linears, attention without its projections, the rest of the decoder layers (norms, activation,
residuals), the model outside its layers (embedding, final norm, masks) and ``generate``'s own work per token;
next to the bytes of weights read per token, the effective GB/s and the share of the measured read bandwidth.

    PYTHONPATH=. python benchmarks/decode_breakdown.py [--steps 48] [--runs 3] [--threads 2]

Rows: float32, int8 per channel, int4 g128 (round-to-nearest through the fused kernel) and the bundled Q4_1 GGUF
read with ``load_gguf`` (its bits kept). A manual decode loop (one token per forward, a ``DynamicCache``) is timed
once without hooks ("forward per token") and once with forward hooks that time the parts (hooks add their own
cost, reported as "hook overhead"). ``generate`` per token is timed separately (median of ``--runs`` runs).
Writes ``benchmarks/results/decode_breakdown.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig, QuantLinear
from hf_efficiency.demo import bundled_gguf_path, bundled_model_path
from hf_efficiency.formats import load_compressed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_kernels import bandwidth  # noqa: E402  (the same read-bandwidth measure as the kernel table)

PROMPT = "The King James Bible begins with the book of Genesis. In the beginning"


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters(recurse=False)) + sum(
        t.numel() * t.element_size() for t in module.buffers(recurse=False)
    )


def bytes_per_token(model) -> int:
    """Bytes of weights one decoded token reads: every linear of the decoder layers and the head (embedding and
    norm rows read per token are negligible)."""
    head = model.get_output_embeddings()
    total = _tensor_bytes(head)
    for m in model.model.layers.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            total += _tensor_bytes(m)
    return total


def _step_loop(model, ids, steps: int) -> float:
    """Seconds per token of a manual greedy loop of ``steps`` single-token forwards after the prompt."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps


class PartTimer:
    """Forward hooks timing the head, each decoder layer, each attention module and each linear inside the layers."""

    def __init__(self, model) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.handles = []
        self._starts: dict[int, float] = {}
        self._hook(model.get_output_embeddings(), "head")
        for layer in model.model.layers:
            self._hook(layer, "layers")
            self._hook(layer.self_attn, "attention")
            for name, m in layer.named_modules():
                if isinstance(m, (nn.Linear, QuantLinear)):
                    self._hook(m, "attention linears" if name.startswith("self_attn.") else "mlp linears")

    def _hook(self, module: nn.Module, part: str) -> None:
        key = id(module)

        def pre(_m, _args):
            self._starts[key] = time.perf_counter()

        def post(_m, _args, _out):
            self.totals[part] += time.perf_counter() - self._starts.pop(key)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def breakdown(model, ids, steps: int, runs: int) -> dict:
    _step_loop(model, ids, 4)  # warm-up: kernel layouts, allocator
    plain = statistics.median(_step_loop(model, ids, steps) for _ in range(runs))
    timer = PartTimer(model)
    timer.totals.clear()
    hooked = _step_loop(model, ids, steps)
    timer.remove()
    # the prompt forward is timed too: subtract its share by timing it alone with the same hooks
    prompt_timer = PartTimer(model)
    with torch.no_grad():
        model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    prompt_timer.remove()
    t = {k: (timer.totals[k] - prompt_timer.totals[k]) / steps for k in timer.totals}
    linears = t["attention linears"] + t["mlp linears"]
    parts = {
        "head": t["head"],
        "decoder linears": linears,
        "attention without projections": t["attention"] - t["attention linears"],
        "rest of the layers (norms, activation, residuals)": t["layers"] - t["attention"] - t["mlp linears"],
        "model outside the layers (embedding, final norm, masks)": hooked - t["head"] - t["layers"],
    }
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    gen = []
    for _ in range(runs):
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        gen.append(time.perf_counter() - start)
    # generate's time includes the prompt forward: take it out with a timed prompt forward
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        prompt_s = time.perf_counter() - start
    gen_per_token = (statistics.median(gen) - prompt_s) / steps
    return {
        "forward_ms": plain * 1e3,
        "hook_overhead_ms": (hooked - plain) * 1e3,
        "generate_ms": gen_per_token * 1e3,
        "generate_tokens_per_s": steps / statistics.median(gen),
        "parts_ms": {k: v * 1e3 for k, v in parts.items()},
        "hooked_ms": hooked * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth()
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s ({args.threads} threads)")
    path = str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    rows = [
        ("fp32", lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)),
        (
            "int8 per channel",
            lambda: AutoModelForCausalLM.from_pretrained(
                path,
                efficiency_config=EfficiencyConfig(quantization={"bits": 8, "group_size": None, "symmetric": True}),
            ),
        ),
        (
            "int4 g128",
            lambda: AutoModelForCausalLM.from_pretrained(
                path, efficiency_config=EfficiencyConfig(quantization={"bits": 4, "group_size": 128})
            ),
        ),
        ("Q4_1 GGUF (load_gguf)", lambda: load_compressed(str(bundled_gguf_path()), dtype=torch.float32)),
    ]
    results = []
    for name, build in rows:
        model = build().eval()
        r = breakdown(model, ids, args.steps, args.runs)
        r["model"] = name
        r["bytes_per_token"] = bytes_per_token(model)
        r["effective_gb_s"] = r["bytes_per_token"] / (r["forward_ms"] / 1e3) / 1e9
        results.append(r)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_ms"].items())
        print(
            f"{name}: forward {r['forward_ms']:.2f} ms/token, generate {r['generate_ms']:.2f} ms/token "
            f"({r['generate_tokens_per_s']:.1f} tok/s), {r['bytes_per_token'] / 1e6:.1f} MB/token "
            f"-> {r['effective_gb_s']:.1f} GB/s; {parts}"
        )
        del model
    names = list(results[0]["parts_ms"])
    lines = [
        f"SmolLM2-135M-Instruct, batch 1, {ids.shape[1]}-token prompt, {args.steps} decoded tokens, {args.threads} "
        f"threads, read bandwidth {bw / 1e9:.1f} GB/s (sum of a 512 MiB tensor). Milliseconds per token; the parts "
        "are timed with forward hooks (their cost is the 'hook overhead' row), 'forward' without hooks.",
        "",
        "| | " + " | ".join(r["model"] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['parts_ms'][n]:.2f}" for r in results) + " |")
    lines.append("| hook overhead | " + " | ".join(f"{r['hook_overhead_ms']:.2f}" for r in results) + " |")
    lines.append("| **forward per token** | " + " | ".join(f"**{r['forward_ms']:.2f}**" for r in results) + " |")
    lines.append(
        "| generate per token (prompt excluded) | " + " | ".join(f"{r['generate_ms']:.2f}" for r in results) + " |"
    )
    lines.append("| generate tokens/s | " + " | ".join(f"{r['generate_tokens_per_s']:.1f}" for r in results) + " |")
    lines.append(
        "| weight MB read per token | " + " | ".join(f"{r['bytes_per_token'] / 1e6:.1f}" for r in results) + " |"
    )
    lines.append(
        "| effective GB/s (forward) | "
        + " | ".join(f"{r['effective_gb_s']:.1f} ({r['effective_gb_s'] * 1e9 / bw:.0%})" for r in results)
        + " |"
    )
    table = "\n".join(lines)
    print(table)
    res = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(res, "decode_breakdown.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(res, "decode_breakdown.json"), "w") as fh:
        json.dump({"bandwidth_gb_s": bw / 1e9, "threads": args.threads, "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
