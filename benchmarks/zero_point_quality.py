"""Float minimum vs integer zero point (``quantization.zero_point``) per method, on the bundled SmolLM2-135M.

Each asymmetric scheme is quantized twice, once with ``zero_point="float"`` (a float16 minimum per group,
``w = u * s + m``) and once with ``zero_point="integer"`` (a uint8 zero point, ``w = (u - z) * s``: the grid
GPTQ, AWQ, compressed-tensors and vLLM store, so the model exports to them exactly), and evaluated on the
same KJV evaluation windows as benchmarks/quantization.py (perplexity via hf_efficiency.evaluate), with
the fp32 model as the reference measured in the same run. Bits/weight: stored bits per quantized weight.

    python benchmarks/zero_point_quality.py                  # every row (~30 min on 2 cores)
    python benchmarks/zero_point_quality.py --rows rtn-w4-g128 --num-tokens 4096

Writes benchmarks/results/zero_point.md and .json (rows are written as they finish).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch  # noqa: E402

import hf_efficiency  # noqa: E402,F401
from hf_efficiency import EfficiencyConfig  # noqa: E402
from hf_efficiency.data import load_text, token_windows  # noqa: E402
from hf_efficiency.demo import resolve_model_path  # noqa: E402
from hf_efficiency.evaluate import perplexity, weight_bytes  # noqa: E402
from hf_efficiency.quant.methods import METHODS  # noqa: E402

CAL = {"dataset": "kjv", "samples": 32, "sequence_length": 512}
ZERO_POINTS = ("float", "integer")

#: row name -> (method, bits, group size)
ROWS: dict[str, tuple[str, int, int]] = {
    "rtn-w4-g128": ("rtn", 4, 128),
    "hqq-w4-g128": ("hqq", 4, 128),
    "awq-w4-g128": ("awq", 4, 128),
    "gptq-w4-g128": ("gptq", 4, 128),
    "rtn-w3-g64": ("rtn", 3, 64),
    "gptq-w3-g64": ("gptq", 3, 64),
}


def config(method: str, bits: int, group: int, zero_point: str) -> EfficiencyConfig:
    cfg = {"quantization": {"method": method, "bits": bits, "group_size": group, "zero_point": zero_point}}
    if METHODS[method].calibrated:
        cfg["calibration"] = CAL
    return EfficiencyConfig(**cfg)


def write_tables(results: dict, meta: dict, out: str) -> str:
    with open(out + ".json", "w") as fh:
        json.dump({**meta, **results}, fh, indent=2)
    base = results.get("fp32")
    lines = [
        f"SmolLM2-135M-Instruct, fp32 activations, {meta['threads']} CPU threads. Perplexity on the KJV evaluation "
        f"slice ({meta['windows']} windows x {meta['window']} tokens); awq/gptq calibrate on {meta['calibration']}. "
        "float: a float16 minimum per group (`w = u * s + m`); integer: a uint8 zero point per group "
        "(`w = (u - z) * s`, the GPTQ/AWQ/compressed-tensors grid, range widened to include 0). "
        "Bits/weight: stored bits per quantized weight (codes + float16 scales + minima or zero points)."
        + (f" fp32 perplexity: {base:.3f}." if base is not None else ""),
        "",
        "| scheme | method | bits | group | ppl float | ppl integer | integer vs float | "
        "bits/weight float | bits/weight integer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (method, bits, group) in ROWS.items():
        r = results["rows"].get(name, {})
        f, i = r.get("float"), r.get("integer")
        cells = [
            name,
            method,
            str(bits),
            str(group),
            f"{f['perplexity']:.3f}" if f else "-",
            f"{i['perplexity']:.3f}" if i else "-",
            f"{100 * (i['perplexity'] / f['perplexity'] - 1):+.2f}%" if f and i else "-",
            f"{f['bits_per_weight']:.3f}" if f else "-",
            f"{i['bits_per_weight']:.3f}" if i else "-",
        ]
        if f or i:
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(out + ".md", "w") as fh:
        fh.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    ap.add_argument("--num-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zero_point"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, load_text("kjv", "evaluation"), args.window, args.num_tokens)
    meta = {
        "model": path,
        "threads": args.threads,
        "windows": windows.shape[0],
        "window": args.window,
        "calibration": f"{CAL['samples']} windows x {CAL['sequence_length']} tokens of the KJV calibration slice",
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results: dict = {"rows": {}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results["fp32"] = perplexity(model, windows, progress=False)["perplexity"]
    del model
    print(json.dumps({"fp32": results["fp32"]}), flush=True)
    for name in args.rows:
        method, bits, group = ROWS[name]
        for zero_point in ZERO_POINTS:
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, efficiency_config=config(method, bits, group, zero_point)
            ).eval()
            load_s = time.perf_counter() - t0
            ppl = perplexity(model, windows, progress=False)["perplexity"]
            row = {
                "perplexity": ppl,
                "vs_fp32_pct": 100.0 * (ppl / results["fp32"] - 1.0),
                "bits_per_weight": weight_bytes(model)["bits_per_weight"],
                "load_quantize_s": round(load_s, 2),
            }
            results["rows"].setdefault(name, {})[zero_point] = row
            print(json.dumps({"row": name, "zero_point": zero_point, **row}), flush=True)
            write_tables(results, meta, args.out)
            del model
    print(write_tables(results, meta, args.out))


if __name__ == "__main__":
    main()
