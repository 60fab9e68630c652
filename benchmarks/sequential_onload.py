"""Sequential onloading on a model larger than a third of memory: peak RSS of GPTQ and AWQ 4-bit quantization
of a 1.66B-parameter Llama-shaped model saved in float32 shards (6.6 GB), one decoder layer at a time.

    python benchmarks/sequential_onload.py                    # builds the model once, then gptq and awq
    python benchmarks/sequential_onload.py --methods gptq --samples 8 --length 256

The model: Llama layout (hidden 2048, intermediate 8192, 24 layers, 32 heads, 8 key/value heads, SmolLM2's
49152-token vocabulary and tokenizer, untied head), random weights (normal, std 0.02; norms 1), written
layer by layer (never held whole) to ``--model-dir`` as one float32 safetensors shard per decoder layer.

Each method runs in a fresh process (``hf_efficiency.quantize_sequential``,
calibration on the bundled KJV slice) that reports its peak resident set size (``VmHWM``: every page the
process ever had resident, memory-mapped checkpoint pages included). The table compares it with the float32
size of the checkpoint; the target is at most one third. Writes ``results/sequential_onload.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = Path(ROOT) / "benchmarks" / "results"
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def build_model(folder: Path) -> int:
    """Write the random float32 checkpoint (config, tokenizer, one shard per layer + one for the rest), never
    holding more than one layer; return its float32 byte size."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_efficiency.demo import bundled_model_path

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, dtype="float32")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    pieces: dict[str, list[str]] = {}
    for k in shapes:
        parts = k.split(".")
        piece = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "rest"
        pieces.setdefault(piece, []).append(k)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    names = sorted(pieces)
    for i, piece in enumerate(names):
        filename = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for k in pieces[piece]:
            if k.endswith("norm.weight"):
                tensors[k] = torch.ones(shapes[k])
            else:
                tensors[k] = torch.randn(shapes[k], generator=gen).mul_(0.02)
            weight_map[k] = filename
            total += tensors[k].numel() * 4
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        del tensors
        print(f"wrote {filename} ({piece})", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(folder)
    return total


def checkpoint_bytes(folder: Path) -> int:
    return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def run_one(model_dir: str, out_dir: str, method: str, samples: int, length: int) -> dict:
    """In this (fresh) process: quantize sequentially, return seconds and peak RSS."""
    import torch

    from hf_efficiency import EfficiencyConfig
    from hf_efficiency.integration.sequential import quantize_sequential

    torch.manual_seed(0)
    cfg = EfficiencyConfig(
        quantization={"method": method, "bits": 4, "group_size": 128},
        calibration={"dataset": "kjv", "samples": samples, "sequence_length": length},
    )
    start = time.perf_counter()
    report = quantize_sequential(model_dir, cfg, out_dir, progress=True)
    seconds = time.perf_counter() - start
    with open("/proc/self/status", encoding="ascii") as fh:
        status = dict(line.split(":", 1) for line in fh if ":" in line)
    peak = int(status["VmHWM"].split()[0]) * 1024
    out_bytes = sum(
        os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".safetensors")
    )
    return {
        "method": method,
        "seconds": round(seconds, 1),
        "peak_rss": peak,
        "calibration_tokens": report.calibration_tokens,
        "out_bytes": out_bytes,
        "shards": report.shards,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="/tmp/hf_efficiency_onload_1p6b")
    p.add_argument("--out-root", default="/tmp/hf_efficiency_onload_out")
    p.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    p.add_argument("--samples", type=int, default=8, help="calibration windows (default: 8)")
    p.add_argument("--length", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = run_one(args.model_dir, args.child[1], args.child[0], args.samples, args.length)
        print("RESULT " + json.dumps(result), flush=True)
        return

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors.index.json").exists():
        build_model(model_dir)
    size = checkpoint_bytes(model_dir)
    params = size // 4
    rows = []
    for method in args.methods:
        out = os.path.join(args.out_root, method)
        cmd = [sys.executable, __file__, "--model-dir", str(model_dir), "--samples", str(args.samples)]
        cmd += ["--length", str(args.length), "--child", method, out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{method}: the child process failed ({proc.returncode})")
        r = json.loads(line[0][len("RESULT ") :])
        r["ratio"] = round(r["peak_rss"] / size, 4)
        rows.append(r)
        print(
            f"{method}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB = {r['ratio']:.3f} x float32 size, {r['seconds']} s",
            flush=True,
        )

    previous = RESULTS / "sequential_onload.json"
    if previous.exists():  # keep the rows of methods not rerun (same model and calibration only)
        old = json.loads(previous.read_text())
        if old.get("float32_bytes") == size and old.get("calibration") == [args.samples, args.length]:
            rerun = {r["method"] for r in rows}
            rows = [r for r in old["rows"] if r["method"] not in rerun] + rows
            rows.sort(key=lambda r: ["gptq", "awq"].index(r["method"]) if r["method"] in ("gptq", "awq") else 9)
    gib = 2**30
    lines = [
        f"Sequential onloading: {params / 1e9:.2f}B-parameter Llama-shaped model (hidden 2048, intermediate 8192, 24 "
        f"layers), float32 checkpoint {size / gib:.2f} GiB; 4-bit group 128; calibration {args.samples} x "
        f"{args.length} KJV tokens. CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| method | peak RSS (GiB) | / float32 size | target <= 1/3 | seconds | output (GiB) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        ok = "yes" if r["ratio"] <= 1 / 3 else "no"
        lines.append(
            f"| {r['method']} | {r['peak_rss'] / gib:.2f} | {r['ratio']:.3f} | {ok} | {r['seconds']:.0f} | "
            f"{r['out_bytes'] / gib:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sequential_onload.md").write_text(text)
    payload = {
        "float32_bytes": size,
        "parameters": params,
        "shape": SHAPE,
        "calibration": [args.samples, args.length],
        "rows": rows,
    }
    (RESULTS / "sequential_onload.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
