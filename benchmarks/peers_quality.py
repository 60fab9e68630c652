"""Peer quantizers (Intel auto-round, vLLM llm-compressor GPTQ) on our model, calibration and evaluation slice.

Same protocol as ``benchmarks/quantization.py``: the bundled SmolLM2-135M-Instruct (fp32), perplexity on the
fixed KJV evaluation slice (32 windows x 512 tokens, :func:`hf_efficiency.evaluate.perplexity`) and, for
calibration, the 32 windows x 512 tokens of the KJV calibration slice that our calibrated pipeline uses
(``hf_efficiency.quant.calibrated.capture.calibration_windows``: the tokenizer adds no BOS, so these are
plain ``token_windows`` of ``load_text("kjv", "calibration")``). Weight-only, asymmetric (zero point);
``lm_head`` (tied to the input embedding) stays float, as in our table.

After a peer quantizes, every decoder ``nn.Linear`` weight (which both peers leave as dequantized
float values: auto-round's in-memory "fake" result, llm-compressor's GPTQ update) is copied into a
fresh fp32 copy of the float model, so both are scored by the same plain transformers forward with
no peer hooks. A check counts the distinct values in every quantization group of those weights
(``levels``: at most ``2**bits`` when the weights really are on the peer's grid).

The peers need package versions that must not replace this environment's torch, so they live in a
separate virtual environment that sees the system packages (torch 2.13 CPU, transformers 5.25)::

    python -m venv --system-site-packages /work/.venv-peers
    /work/.venv-peers/bin/pip install --no-deps auto-round                      # 0.16.1
    /work/.venv-peers/bin/pip install --no-deps llmcompressor compressed-tensors==0.19.0 nvidia-ml-py
    # llmcompressor 0.14.0.1 pins transformers<=5.17 and auto-round<=0.15.1; with --no-deps it imports
    # and runs on transformers 5.25 / auto-round 0.16.1 (its GPTQ path does not use auto-round).

auto-round runs its CPU path in fp32 (``amp=False``: its default bf16 autocast was slower here) without
``torch.compile``, on our 32 windows x 512 tokens, with ``iters=10, batch_size=4`` instead of its defaults
(``iters=200, nsamples=128, seqlen=2048, batch_size=8``): one block took 74 s for 20 iters at batch 8, so
the defaults would take hours per scheme on 2 cores; 10 iters at batch 4 take about 25 s a block (about
13 min a scheme). llm-compressor runs ``GPTQModifier`` (its default ``actorder="static"``, block 128,
dampening 0.01) through ``oneshot``; about 40 s a scheme on an idle machine, 8 min under heavy contention.
Group 128 does not divide this model's 576 hidden columns: llm-compressor refuses that scheme up front,
and with ``bypass_divisibility_checks=True`` (what this script passes) its observer fails; that is
recorded as the row.

Run (rows are merged into the results as they finish; each peer x scheme can be run alone)::

    /work/.venv-peers/bin/python benchmarks/peers_quality.py
    /work/.venv-peers/bin/python benchmarks/peers_quality.py --peers llmcompressor --schemes w4-g128
    /work/.venv-peers/bin/python benchmarks/peers_quality.py --peers auto-round --ar-iters 200 --ar-batch-size 8

Writes benchmarks/results/peers_quality.md and .json. A peer that is not importable is skipped with a
message (and no row).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch
from torch import nn

from hf_efficiency.data import load_text, token_windows
from hf_efficiency.demo import bundled_model_path
from hf_efficiency.evaluate import perplexity

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FP32_PPL = 13.805  # benchmarks/results/quantization.md, fp32 row (re-measured here with --measure-fp32)

#: scheme -> (bits, group size); all asymmetric weight-only
SCHEMES: dict[str, tuple[int, int]] = {"w4-g128": (4, 128), "w3-g64": (3, 64), "w2-g32": (2, 32)}
PEERS = ("auto-round", "llmcompressor")
#: our own rows of benchmarks/results/quantization.json, for context in the table
OURS = {
    "w4-g128": ("autoround-w4-g128", "gptq-w4-g128-actorder", "awq-w4-g128"),
    "w3-g64": ("autoround-w3-g64", "gptq-w3-g64", "awq-w3-g64"),
    "w2-g32": ("autoround-w2-g32", "gptq-w2-g32"),
}


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def importable(peer: str) -> str | None:
    """``None`` if the peer imports, else the error message."""
    try:
        if peer == "auto-round":
            from auto_round import AutoRound  # noqa: F401
        else:
            from llmcompressor import oneshot  # noqa: F401
            from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip this peer"
        return f"{type(e).__name__}: {e}"
    return None


def load_model(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def group_levels(w: torch.Tensor, group: int) -> int:
    """Largest number of distinct values in one group of ``group`` input columns (partial last group included)."""
    most = 0
    for chunk in w.detach().float().split(group, dim=1):
        s = chunk.sort(dim=1).values
        distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
        most = max(most, int(distinct.max()))
    return most


def into_fresh_model(path: str, quantized: nn.Module, group: int) -> tuple[nn.Module, dict]:
    """A fresh fp32 float model whose decoder linear weights are ``quantized``'s (dequantized) weights."""
    fresh = load_model(path)
    src = decoder_linears(quantized)
    dst = decoder_linears(fresh)
    if set(src) != set(dst):
        raise RuntimeError(f"module names differ: {sorted(set(src) ^ set(dst))[:5]}")
    changed, levels = 0, 0
    with torch.no_grad():
        for name, lin in dst.items():
            w = src[name].weight.detach().to("cpu", torch.float32)
            changed += int(not torch.equal(w, lin.weight))
            levels = max(levels, group_levels(w, group))
            lin.weight.copy_(w)
    head_same = torch.equal(quantized.get_output_embeddings().weight.detach().float().cpu(), fresh.lm_head.weight)
    return fresh, {
        "linears": len(dst),
        "linears_changed": changed,
        "max_levels_per_group": levels,
        "lm_head_float": head_same,
    }


def run_auto_round(path, tok, cal, bits, group, args) -> tuple[nn.Module, dict, float]:
    from auto_round import AutoRound

    model = load_model(path)
    opts = {
        "bits": bits,
        "group_size": group,
        "sym": False,
        "iters": args.ar_iters,
        "nsamples": cal.shape[0],
        "seqlen": cal.shape[1],
        "batch_size": args.ar_batch_size,
        "device_map": "cpu",
        "amp": False,
        "enable_torch_compile": False,
    }
    t = time.perf_counter()
    ar = AutoRound(model, tok, dataset=[cal[i : i + 1] for i in range(cal.shape[0])], **opts)
    quantized, _ = ar.quantize()
    seconds = time.perf_counter() - t
    opts.update({"lr": "default (1/iters)", "dataset": f"our KJV calibration windows {list(cal.shape)}"})
    return quantized, opts, seconds


def run_llmcompressor(path, tok, cal, bits, group, args) -> tuple[nn.Module, dict, float]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = load_model(path)
    weights = QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=group, symmetric=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    in_features = {m.in_features for m in decoder_linears(model).values()}
    bypass = any(f % group for f in in_features)  # 576 % 128 != 0: llm-compressor refuses unless told
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], bypass_divisibility_checks=bypass)
    data = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()})
    t = time.perf_counter()
    try:
        quantized = oneshot(
            model=model,
            tokenizer=tok,
            recipe=modifier,
            dataset=data,
            num_calibration_samples=cal.shape[0],
            max_seq_length=cal.shape[1],
            shuffle_calibration_samples=False,
        )
    except Exception as e:
        if not bypass:
            raise
        raise RuntimeError(
            f"group {group} does not divide in_features {sorted(f for f in in_features if f % group)}: without "
            "bypass_divisibility_checks llm-compressor refuses up front ('not divisible by group_size ... add these "
            f"layer names to the modifier's ignore list'); with it, GPTQ fails: {type(e).__name__}: {e}"
        ) from e
    seconds = time.perf_counter() - t
    opts = {
        "scheme": f"int{bits} group {group} asymmetric (config_groups; W4A16_ASYM preset equivalent at 4 bits)",
        "actorder": str(modifier.actorder),
        "block_size": modifier.block_size,
        "dampening_frac": modifier.dampening_frac,
        "bypass_divisibility_checks": bypass,
        "pipeline": "oneshot default",
        "dataset": f"our KJV calibration windows {list(cal.shape)}",
    }
    return quantized, opts, seconds


RUNNERS = {"auto-round": run_auto_round, "llmcompressor": run_llmcompressor}
DISTS = {"auto-round": ["auto-round"], "llmcompressor": ["llmcompressor", "compressed-tensors"]}


def ours_rows() -> dict[str, float]:
    try:
        with open(os.path.join(RESULTS, "quantization.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    rows = data.get("rows", data) if isinstance(data, dict) else data
    return {r["scheme"]: r["perplexity"] for r in rows if isinstance(r, dict) and "perplexity" in r}


def fmt_delta(ppl: float | None, ref: float) -> str:
    return "-" if ppl is None or not math.isfinite(ppl) else f"{100 * (ppl / ref - 1):+.2f}%"


def write(meta: dict, rows: list[dict]) -> str:
    order = {s: i for i, s in enumerate(SCHEMES)}
    rows.sort(key=lambda r: (order.get(r["scheme"], 99), r["peer"]))
    with open(os.path.join(RESULTS, "peers_quality.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    ours = ours_rows()
    lines = [
        f"Peer quantizers on SmolLM2-135M-Instruct. Perplexity on our KJV evaluation slice (32 windows x 512 tokens), fp32 reference {meta['fp32_ppl']:.3f}. "
        "Calibration: our KJV calibration slice, 32 windows x 512 tokens. Weight-only, asymmetric (zero point); "
        "lm_head (tied) float. Each peer's dequantized decoder weights are copied into a fresh fp32 model and "
        "scored with `hf_efficiency.evaluate.perplexity`. Levels: most distinct values in one quantization "
        "group (at most 2^bits on a real grid). Quantize s: wall seconds of the peer's quantize call on "
        f"{meta['threads']} CPU threads of a machine shared with other jobs (timings are under contention). "
        f"Peer environment: {meta['environment']}.",
        "",
        "| peer | version | scheme | options | perplexity | vs fp32 | levels | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['peer']} | {r['version']} | {r['scheme']} | - | failed: {r['error']} | - | - | - |")
            continue
        o = r["options"]
        if r["peer"] == "auto-round":
            opt = f"iters={o['iters']}, nsamples={o['nsamples']}, seqlen={o['seqlen']}, batch_size={o['batch_size']}, fp32 (amp off), no torch.compile"
        else:
            opt = f"GPTQ, actorder={o['actorder']}, block_size={o['block_size']}, dampening={o['dampening_frac']}"
            opt += ", bypass_divisibility_checks" if o["bypass_divisibility_checks"] else ""
        lines.append(
            f"| {r['peer']} | {r['version']} | {r['scheme']} | {opt} | {r['perplexity']:.3f} | "
            f"{fmt_delta(r['perplexity'], meta['fp32_ppl'])} | {r['check']['max_levels_per_group']} | {r['quantize_s']:.1f} |"
        )
    done = {(r["peer"], r["scheme"]) for r in rows}
    missing = [f"{p} {s}" for s in SCHEMES for p in PEERS if (p, s) not in done]
    if missing:
        lines += [
            "",
            f"Not measured yet (time budget): {', '.join(missing)}; run with `--peers PEER --schemes SCHEME`.",
        ]
    if ours:
        lines += ["", "Ours, same slices (from `benchmarks/results/quantization.json`):", ""]
        lines += ["| scheme | perplexity | vs fp32 |", "|---|---|---|"]
        for names in OURS.values():
            for name in names:
                if name in ours:
                    lines.append(f"| {name} | {ours[name]:.3f} | {fmt_delta(ours[name], meta['fp32_ppl'])} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "peers_quality.md"), "w") as f:
        f.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--ar-iters", type=int, default=10, help="auto-round iters (its default is 200; see docstring)")
    ap.add_argument("--ar-batch-size", type=int, default=4, help="auto-round batch_size (its default is 8)")
    ap.add_argument("--measure-fp32", action="store_true", help="re-measure the fp32 perplexity here")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json, measure nothing")
    ap.add_argument("--fresh", action="store_true", help="drop earlier rows instead of merging into them")
    args = ap.parse_args()

    json_path = os.path.join(RESULTS, "peers_quality.json")
    if args.report_only:
        with open(json_path) as f:
            saved = json.load(f)
        print(write(saved["meta"], saved["rows"]))
        return

    torch.manual_seed(0)
    from transformers import AutoTokenizer

    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, load_text("kjv", "evaluation"), 512, 16384)
    cal = token_windows(tok, load_text("kjv", "calibration"), 512, 32 * 512)
    fp32 = perplexity(load_model(path), windows, progress=False)["perplexity"] if args.measure_fp32 else FP32_PPL

    meta = {
        "model": "SmolLM2-135M-Instruct (bundled, fp32)",
        "fp32_ppl": fp32,
        "eval": "KJV evaluation slice, 32 windows x 512",
        "calibration": "KJV calibration slice, 32 windows x 512",
        "threads": torch.get_num_threads(),
        "environment": f"python {platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}",
        "note": "timings on a shared machine (other jobs running): under contention",
    }
    rows: list[dict] = []
    if not args.fresh and os.path.exists(json_path):
        with open(json_path) as f:
            rows = json.load(f).get("rows", [])

    available = {}
    for peer in args.peers:
        err = importable(peer)
        if err:
            print(f"[peers_quality] skipping {peer}: not importable ({err})", flush=True)
        else:
            available[peer] = ", ".join(f"{d} {version(d)}" for d in DISTS[peer])

    for scheme in args.schemes:  # w4 for every peer first, then w3, then w2
        bits, group = SCHEMES[scheme]
        for peer, ver in available.items():
            print(f"[peers_quality] {peer} {scheme} ...", flush=True)
            row = {"peer": peer, "version": ver, "scheme": scheme, "bits": bits, "group": group}
            try:
                quantized, opts, seconds = RUNNERS[peer](path, tok, cal, bits, group, args)
                fresh, check = into_fresh_model(path, quantized, group)
                del quantized
                gc.collect()
                ppl = perplexity(fresh, windows, progress=False)["perplexity"]
                row.update(options=opts, quantize_s=seconds, check=check, perplexity=ppl)
                row["delta_pct"] = 100 * (ppl / fp32 - 1)
                print(
                    f"[peers_quality] {peer} {scheme}: ppl {ppl:.3f} ({fmt_delta(ppl, fp32)}), {seconds:.0f} s, {check}"
                )
                del fresh
            except Exception as e:  # noqa: BLE001 - record the failure as the row
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:700]
            gc.collect()
            rows = [r for r in rows if (r["peer"], r["scheme"]) != (peer, scheme)] + [row]
            write(meta, rows)
    print(write(meta, rows))


if __name__ == "__main__":
    main()
