"""Quality and size of weight quantization schemes on the bundled SmolLM2-135M (one run).

For each scheme: perplexity on the fixed KJV evaluation slice (hf_efficiency.evaluate), change
versus fp32 measured in the same run, quantized-linear bytes in memory and on disk against the
prediction ``params * bits / 8 + groups * (scale [+ min]) bytes``, and quantization time.

    python benchmarks/quantization.py                 # all schemes, 16k tokens
    python benchmarks/quantization.py --num-tokens 4096 --schemes int8-channel-sym int4-g128

Writes benchmarks/results/quantization.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig
from hf_efficiency.data import load_text, resolve_model_path, token_windows
from hf_efficiency.evaluate import decode_speed, disk_bytes, perplexity, weight_bytes
from hf_efficiency.quant.linear import QuantLinear

SCHEMES: dict[str, dict | None] = {
    "fp32": None,
    "int8-channel-sym": {"bits": 8, "group_size": None, "symmetric": True, "clip": "none"},
    "int4-g128-clip": {"bits": 4, "group_size": 128, "symmetric": False, "clip": "mse"},
    "int4-g128-noclip": {"bits": 4, "group_size": 128, "symmetric": False, "clip": "none"},
    "int4-g64-clip": {"bits": 4, "group_size": 64, "symmetric": False, "clip": "mse"},
    "int4-g32-clip": {"bits": 4, "group_size": 32, "symmetric": False, "clip": "mse"},
    "int4-g32-noclip": {"bits": 4, "group_size": 32, "symmetric": False, "clip": "none"},
    "int3-g128-clip": {"bits": 3, "group_size": 128, "symmetric": False, "clip": "mse"},
    "int3-g128-noclip": {"bits": 3, "group_size": 128, "symmetric": False, "clip": "none"},
    "int2-g64-clip": {"bits": 2, "group_size": 64, "symmetric": False, "clip": "mse"},
}


def predicted_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(packed-integer bytes at exactly bits/8 per weight, scale/min overhead bytes)."""
    ints = overhead = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            ints += m.in_features * m.out_features * m.bits // 8
            per = m.weight_scale.element_size() * (1 if m.weight_min is None else 2)
            overhead += m.weight_scale.numel() * per
    return ints, overhead


def quantized_disk_bytes(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as fh:
                for k in fh.keys():
                    if k.endswith((".weight", ".weight_scale", ".weight_min")) and (
                        k.endswith((".weight_scale", ".weight_min")) or fh.get_slice(k).get_dtype() == "I32"
                    ):
                        sl = fh.get_slice(k)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        total += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[sl.get_dtype()]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    ap.add_argument("--num-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--speed", action="store_true", help="also measure greedy decode tokens/s")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantization"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, load_text("kjv", "evaluation"), args.window, args.num_tokens)
    rows = []
    base_ppl = None
    for name in args.schemes:
        spec = SCHEMES[name]
        t0 = time.perf_counter()
        kwargs = {"dtype": torch.float32}
        if spec is not None:
            kwargs["efficiency_config"] = EfficiencyConfig(quantization=spec)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        load_s = time.perf_counter() - t0
        ppl = perplexity(model, windows, progress=False)["perplexity"]
        if spec is None:
            base_ppl = ppl
        row = {"scheme": name, "perplexity": ppl, "load_quantize_s": round(load_s, 2)}
        if base_ppl is not None:
            row["delta_pct"] = 100.0 * (ppl / base_ppl - 1.0)
        wb = weight_bytes(model)
        row["bytes_total"] = wb["total"]
        if spec is not None:
            ints, overhead = predicted_bytes(model)
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                row["disk_total"] = disk_bytes(d)
                row["disk_quantized"] = quantized_disk_bytes(d)
            row.update(
                quantized_bytes=wb["quantized"],
                predicted_bytes=ints + overhead,
                predicted_overhead=overhead,
                memory_vs_predicted_pct=100.0 * (wb["quantized"] / (ints + overhead) - 1),
                disk_vs_predicted_pct=100.0 * (row["disk_quantized"] / (ints + overhead) - 1),
                bits_per_weight=wb["bits_per_weight"],
            )
        if args.speed:
            row["tokens_per_s"] = decode_speed(model, tok)["tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"model": path, "num_tokens": args.num_tokens, "window": args.window, "rows": rows}, fh, indent=2)
    lines = [
        f"Perplexity on the KJV evaluation slice ({windows.shape[0]} windows x {args.window} tokens), "
        "SmolLM2-135M-Instruct, fp32 activations; bytes are the quantized linear layers (packed ints + scales/minima).",
        "",
        "| scheme | perplexity | vs fp32 | bits/weight stored | quantized MiB (memory) | predicted MiB | memory vs predicted | disk vs predicted | load+quantize s |"
        + (" tok/s |" if args.speed else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.speed else ""),
    ]
    for r in rows:
        q = "quantized_bytes" in r
        cells = [
            r["scheme"],
            f"{r['perplexity']:.3f}",
            f"{r.get('delta_pct', 0):+.2f}%",
            f"{r['bits_per_weight']:.3f}" if q else "32",
            f"{r['quantized_bytes'] / 2**20:.2f}" if q else "-",
            f"{r['predicted_bytes'] / 2**20:.2f}" if q else "-",
            f"{r['memory_vs_predicted_pct']:+.2f}%" if q else "-",
            f"{r['disk_vs_predicted_pct']:+.2f}%" if q else "-",
            f"{r['load_quantize_s']:.1f}",
        ]
        if args.speed:
            cells.append(f"{r['tokens_per_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
