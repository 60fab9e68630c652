"""Method x bits x group table on the bundled SmolLM2-135M (one run, one process).

For each scheme: perplexity on the fixed KJV evaluation slice (hf_efficiency.evaluate), change
versus fp32 measured in the same run, bits per weight actually stored (codes + scales/minima +
kept outliers), quantized-linear bytes in memory against the prediction from the module shapes,
greedy decode tokens/s (dequantize-on-the-fly CPU path), and load+quantize seconds (calibration
included for awq/gptq/static/SmoothQuant/mixed).

    python benchmarks/quantization.py                          # every scheme (~50 min on 2 cores)
    python benchmarks/quantization.py --schemes fp32 awq-w4-g128 --no-speed
    python benchmarks/quantization.py --update --schemes hqq-w3-g64   # re-measure rows in place

Writes benchmarks/results/quantization.md and .json (rows are appended as they finish, so an
interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch  # noqa: E402

import hf_efficiency  # noqa: E402,F401
from hf_efficiency import EfficiencyConfig  # noqa: E402
from hf_efficiency.data import load_text, token_windows  # noqa: E402
from hf_efficiency.demo import resolve_model_path  # noqa: E402
from hf_efficiency.evaluate import decode_speed, disk_bytes, perplexity, weight_bytes  # noqa: E402
from hf_efficiency.quant.modules.linear import QuantLinear  # noqa: E402

W8 = {"bits": 8, "group_size": None, "symmetric": True}
CAL = {"calibration": {"dataset": "kjv", "samples": 32, "sequence_length": 512}}


def q(method: str, bits: int, group: int | None, **extra) -> dict:
    return {"quantization": {"method": method, "bits": bits, "group_size": group, **extra}}


#: name -> EfficiencyConfig kwargs (None = the float model)
SCHEMES: dict[str, dict | None] = {
    "fp32": None,
    "rtn-w8-channel": {"quantization": {"method": "rtn", **W8}},
    "w8a8-dynamic": {"quantization": {"method": "rtn", **W8}, "activations": {"mode": "dynamic"}},
    "w8a8-dynamic-smoothquant0.5": {
        "quantization": {"method": "rtn", **W8},
        "activations": {"mode": "dynamic", "smoothquant": 0.5},
        **CAL,
    },
    "w8a8-dynamic-smoothquant0.8": {
        "quantization": {"method": "rtn", **W8},
        "activations": {"mode": "dynamic", "smoothquant": 0.8},
        **CAL,
    },
    "w8a8-dynamic-hadamard": {
        "quantization": {"method": "rtn", **W8, "rotation": "hadamard"},
        "activations": {"mode": "dynamic"},
        **CAL,
    },
    "w8a8-static-p99.99": {"quantization": {"method": "rtn", **W8}, "activations": {"mode": "static"}, **CAL},
    "rtn-w4-g128": q("rtn", 4, 128),
    "rtn-w4-g128-clip": q("rtn", 4, 128, clip="mse"),
    "hqq-w4-g128": q("hqq", 4, 128),
    "awq-w4-g128": {**q("awq", 4, 128), **CAL},
    "gptq-w4-g128": {**q("gptq", 4, 128), **CAL},
    "gptq-w4-g128-actorder": {**q("gptq", 4, 128, gptq_act_order=True), **CAL},
    "rtn-w4-g128-intzero": q("rtn", 4, 128, zero_point="integer"),
    "gptq-w4-g128-actorder-intzero": {**q("gptq", 4, 128, zero_point="integer", gptq={"act_order": True}), **CAL},
    "autoround-w4-g128": {**q("autoround", 4, 128, zero_point="integer"), **CAL},
    "autoround-w4-g128-hadamard": {**q("autoround", 4, 128, zero_point="integer", rotation="hadamard"), **CAL},
    "rtn-w3-g64": q("rtn", 3, 64),
    "rtn-w3-g64-clip": q("rtn", 3, 64, clip="mse"),
    "hqq-w3-g64": q("hqq", 3, 64),
    "hqq-w3-g64-outliers1%": {**q("hqq", 3, 64, outliers=0.01), **CAL},
    "hqq-w3-g64-outliers1%-scale": {**q("hqq", 3, 64, outliers=0.01, hqq_optimize_scale=True), **CAL},
    "awq-w3-g64": {**q("awq", 3, 64), **CAL},
    "gptq-w3-g64": {**q("gptq", 3, 64), **CAL},
    "autoround-w3-g64": {**q("autoround", 3, 64, zero_point="integer"), **CAL},
    "gptq-w3-g64-outliers1%": {**q("gptq", 3, 64, outliers=0.01), **CAL},
    "hqq-mixed-3.0bits-g64": {**q("hqq", 3, 64, target_bits=3.0, bits_choices=[2, 3, 4]), **CAL},
    "hqq-mixed-3.5bits-g64": {**q("hqq", 3, 64, target_bits=3.5, bits_choices=[3, 4]), **CAL},
    "rtn-w2-g32": q("rtn", 2, 32),
    "rtn-w2-g32-clip": q("rtn", 2, 32, clip="mse"),
    "hqq-w2-g32": q("hqq", 2, 32),
    "hqq-w2-g32-scale": q("hqq", 2, 32, hqq_optimize_scale=True),
    "gptq-w2-g32": {**q("gptq", 2, 32), **CAL},
    "autoround-w2-g32": {**q("autoround", 2, 32, zero_point="integer"), **CAL},
}


def predicted_bytes(model: torch.nn.Module) -> int:
    """Bytes the quantized linears must hold: codes at exactly bits/8 per weight, scales and
    minima, 4 bytes per kept outlier (int16 column + float16 value), static input scales, one byte per input
    feature of an online rotation's signs."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features * m.bits // 8
            total += m.weight_scale.numel() * m.weight_scale.element_size() * (1 if m.weight_min is None else 2)
            total += m.weight_zero.numel() if getattr(m, "weight_zero", None) is not None else 0  # uint8 zero points
            total += m.out_features * m.outliers * (m.weight_outlier_index.element_size() + 2 if m.outliers else 0)
            total += 4 if m.input_scale is not None else 0
            total += m.in_features if m.input_rotation is not None else 0  # int8 rotation signs
    return total


def _describe(cfg: dict | None) -> dict:
    if cfg is None:
        return {"method": "fp32", "bits": 32, "group": "-", "extra": ""}
    qz = cfg["quantization"]
    extra = []
    if qz.get("clip") == "mse":
        extra.append("clip=mse")
    if qz.get("gptq_act_order") or qz.get("gptq", {}).get("act_order"):
        extra.append("act_order")
    if qz.get("zero_point") == "integer":
        extra.append("integer zero point")
    if qz.get("rotation"):
        extra.append(f"rotation={qz['rotation']}")
    if qz.get("outliers"):
        extra.append(f"outliers={qz['outliers']:.0%}")
    if qz.get("hqq_optimize_scale"):
        extra.append("hqq_optimize_scale")
    if qz.get("target_bits"):
        extra.append(f"auto mixed {qz['bits_choices']} -> {qz['target_bits']} bits")
    act = cfg.get("activations")
    if act:
        extra.append(
            f"int8 activations {act['mode']}"
            + (f", SmoothQuant {act['smoothquant']}" if act.get("smoothquant") else "")
        )
    method = qz["method"]
    return {"method": method, "bits": qz["bits"], "group": qz["group_size"] or "channel", "extra": ", ".join(extra)}


def write_tables(rows: list[dict], meta: dict, out: str) -> str:
    with open(out + ".json", "w") as fh:
        json.dump({**meta, "rows": rows}, fh, indent=2)
    lines = [
        f"SmolLM2-135M-Instruct on {meta['threads']} CPU threads. Perplexity: KJV evaluation slice "
        f"({meta['windows']} windows x {meta['window']} tokens, disjoint from the calibration slice); "
        f"calibrated methods use {meta['calibration']}. Bits/weight: stored bits per quantized weight "
        "(codes + scales/minima + kept outliers). tok/s: greedy decode of "
        f"{meta['speed_tokens']} tokens, median of {meta['speed_runs']} (CPU dequantize path; W8A8 uses torch._int_mm). "
        "Quantize s: from_pretrained wall time, calibration included.",
        "",
        "| scheme | method | bits | group | options | perplexity | vs fp32 | bits/weight | quantized MiB | memory vs predicted | tok/s | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        has_q = "quantized_bytes" in r
        lines.append(
            "| "
            + " | ".join(
                [
                    r["scheme"],
                    r["method"],
                    str(r["bits"]),
                    str(r["group"]),
                    r["extra"] or "-",
                    f"{r['perplexity']:.3f}",
                    f"{r.get('delta_pct', 0):+.2f}%",
                    f"{r['bits_per_weight']:.3f}" if has_q else "32",
                    f"{r['quantized_bytes'] / 2**20:.2f}" if has_q else "-",
                    f"{r['memory_vs_predicted_pct']:+.2f}%" if has_q else "-",
                    f"{r['tokens_per_s']:.2f}" if "tokens_per_s" in r else "-",
                    f"{r['load_quantize_s']:.1f}",
                ]
            )
            + " |"
        )
    text = "\n".join(lines) + "\n"
    with open(out + ".md", "w") as fh:
        fh.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES), metavar="SCHEME")
    ap.add_argument("--num-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--no-speed", action="store_true", help="skip the decode tokens/s column")
    ap.add_argument("--speed-tokens", type=int, default=16)
    ap.add_argument("--speed-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--update",
        action="store_true",
        help="replace the given schemes' rows in the existing results (fp32 reference taken from them)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantization"))
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
        "calibration": "32 windows x 512 tokens of the KJV calibration slice",
        "speed_tokens": args.speed_tokens,
        "speed_runs": args.speed_runs,
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows: list[dict] = []
    base_ppl = None
    if args.update:
        with open(args.out + ".json") as fh:
            rows = json.load(fh)["rows"]
        base_ppl = next((r["perplexity"] for r in rows if r["scheme"] == "fp32"), None)
        if base_ppl is None:
            raise SystemExit("--update needs an fp32 row in the existing results")
    order = {name: i for i, name in enumerate(SCHEMES)}
    for name in args.schemes:
        cfg = SCHEMES[name]
        t0 = time.perf_counter()
        kwargs = {"dtype": torch.float32}
        if cfg is not None:
            kwargs["efficiency_config"] = EfficiencyConfig(**cfg)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        load_s = time.perf_counter() - t0
        ppl = perplexity(model, windows, progress=False)["perplexity"]
        if cfg is None:
            base_ppl = ppl
        row = {"scheme": name, **_describe(cfg), "perplexity": ppl, "load_quantize_s": round(load_s, 2)}
        if base_ppl is not None:
            row["delta_pct"] = 100.0 * (ppl / base_ppl - 1.0)
        wb = weight_bytes(model)
        row["bytes_total"] = wb["total"]
        if cfg is not None:
            predicted = predicted_bytes(model)
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                row["disk_total"] = disk_bytes(d)
            applied = model.config.quantization_config.quantization
            row.update(
                quantized_bytes=wb["quantized"],
                predicted_bytes=predicted,
                memory_vs_predicted_pct=100.0 * (wb["quantized"] / predicted - 1),
                bits_per_weight=wb["bits_per_weight"],
                module_bits=applied.module_bits,
            )
        if not args.no_speed:
            row["tokens_per_s"] = decode_speed(model, tok, new_tokens=args.speed_tokens, runs=args.speed_runs)[
                "tokens_per_s"
            ]
        rows = sorted(
            [r for r in rows if r["scheme"] != name] + [row], key=lambda r: order.get(r["scheme"], len(order))
        )
        print(json.dumps({k: v for k, v in row.items() if k != "module_bits"}), flush=True)
        write_tables(rows, meta, args.out)
        del model
    print(write_tables(rows, meta, args.out))


if __name__ == "__main__":
    main()
