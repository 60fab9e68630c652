"""Quantized matmul paths per shape and row count on this CPU: time, effective GB/s and the share of the
machine's measured memory bandwidth (the physical limit of decoding, where every weight is read once).

    PYTHONPATH=. python benchmarks/quant_kernels.py [--rows 1,4,16,64,512] [--threads 2] [--compile]

Shapes are SmolLM2-135M's projections (out x in); the head-sized 49152 x 576 only up to 16 rows. Each path cycles through enough copies of its weight
that they do not fit the caches (at least 160 MB per path), as in a real forward pass. Paths:

* ``fp32`` / ``bf16``: ``F.linear`` on float weights (the baselines);
* ``ours int8`` (symmetric per channel), ``ours int4 g128`` / ``g32``, ``ours int3 g64``, ``ours int2 g32``
  (asymmetric): `QuantLinear` through the fused kernel (``cpu_fused``);
* ``dequant int4 g128``: the pure-torch reference path (unpack, de-quantize, ``F.linear``);
* ``torch int8pack``: ``torch._weight_int8pack_mm`` (per-channel int8, float activations);
* ``torch int4pack g128``: ``torch._weight_int4pack_mm_for_cpu`` (tinygemm layout, bf16 activations);
* ``fbgemm dynamic int8``: ``torch.ao`` dynamic quantized linear (quantizes activations per tensor:
  different numbers, listed for speed only);
* ``compiled int4 g128`` (``--compile``): ``torch.compile`` of unpack + de-quantize + matmul (inductor's
  C++ backend), M = 1 and 16 only.

Writes ``benchmarks/results/quant_kernels.{md,json}`` (named so because a ``kernels.py`` here would shadow
the ``kernels`` package that transformers imports).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.nn.functional as F

from hf_efficiency.quant.core.packing import unpack
from hf_efficiency.quant.kernels import cpu as cpu_kernel
from hf_efficiency.quant.modules.linear import QuantLinear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
WORKING_SET = 160 * 2**20


def bandwidth() -> float:
    """Read bandwidth in bytes/s: median time to sum a 512 MiB float32 tensor."""
    t = torch.ones(128 * 2**20)
    t.sum()
    times = []
    for _ in range(7):
        s = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - s)
    return t.numel() * 4 / statistics.median(times)


def median_time(fns, repeats: int) -> float:
    """Median seconds per call, cycling through ``fns`` (one per weight copy)."""
    for f in fns[: min(len(fns), 8)]:
        f()
    times = []
    i = 0
    for _ in range(repeats):
        f = fns[i % len(fns)]
        i += 1
        s = time.perf_counter()
        f()
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, min(300, math.ceil(WORKING_SET / max(nbytes, 1))))


def module_bytes(m) -> int:
    if isinstance(m, QuantLinear):
        return sum(t.numel() * t.element_size() for t in (m.weight, m.weight_scale, m.weight_min) if t is not None)
    return m.weight.numel() * m.weight.element_size()


def make_paths(out_f: int, in_f: int, compile_: bool):
    """``{name: (builder() -> (callable(x), weight bytes), activation dtype, exact)}``."""
    base = torch.nn.Linear(in_f, out_f, bias=False)

    def float_path(dtype):
        def build():
            lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)
            lin.weight.data.copy_(base.weight.data)
            return (lambda x: F.linear(x, lin.weight)), module_bytes(lin)

        return build

    def ours(bits, group, sym, env=None):
        def build():
            m = QuantLinear.from_linear(base, bits=bits, group_size=group, symmetric=sym)
            if env is None:
                lay = cpu_kernel.layout(m)
                return (lambda x: cpu_kernel.forward(m, x, lay)), module_bytes(m)
            return (lambda x: F.linear(x, torch_dequant(m))), module_bytes(m)

        return build

    def torch_int8pack():
        m = QuantLinear.from_linear(base, bits=8, group_size=None, symmetric=True)
        w = (unpack(m.weight, 8, in_f).to(torch.int16) - 128).to(torch.int8).contiguous()
        s = m.weight_scale[:, 0].float().contiguous()
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s)), w.numel() + s.numel() * 4

    def torch_int4pack():
        m = QuantLinear.from_linear(base, bits=4, group_size=128, symmetric=False)
        codes = unpack(m.weight, 4, in_f).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scale = m.weight_scale.float()
        zero = m.weight_min.float() + 8 * scale
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return (
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
        ), packed.numel() * packed.element_size() + sz.numel() * 2

    def fbgemm():
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data.copy_(base.weight.data)
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        return (lambda x: q(x)), out_f * in_f + out_f * 8

    def compiled():
        m = QuantLinear.from_linear(base, bits=4, group_size=128, symmetric=False)
        words, s, mn = m.weight.data, m.weight_scale.data, m.weight_min.data

        @torch.compile(dynamic=False)
        def fused(x, words, s, mn):
            b = words.view(torch.uint8)
            codes = torch.stack([b & 15, b >> 4], -1).reshape(out_f, -1)[:, :in_f].float()
            w = (codes.reshape(out_f, -1, 128) * s.float()[..., None] + mn.float()[..., None]).reshape(out_f, in_f)
            return x @ w.T

        return (lambda x: fused(x, words, s, mn)), module_bytes(m)

    paths = {
        "fp32": (float_path(torch.float32), torch.float32, True),
        "bf16": (float_path(torch.bfloat16), torch.bfloat16, True),
        "ours int8": (ours(8, None, True), torch.float32, True),
        "ours int4 g128": (ours(4, 128, False), torch.float32, True),
        "ours int4 g32": (ours(4, 32, False), torch.float32, True),
        "ours int3 g64": (ours(3, 64, False), torch.float32, True),
        "ours int2 g32": (ours(2, 32, False), torch.float32, True),
        "dequant int4 g128": (ours(4, 128, False, env="dequant"), torch.float32, True),
        "torch int8pack": (torch_int8pack, torch.float32, True),
        "torch int4pack g128": (torch_int4pack, torch.bfloat16, True),
        "fbgemm dynamic int8": (fbgemm, torch.float32, False),
    }
    if compile_:
        paths["compiled int4 g128"] = (compiled, torch.float32, True)
    return paths


def torch_dequant(m):
    from hf_efficiency.quant.core.scheme import dequantize_codes

    codes = unpack(m.weight, m.bits, m.in_features)
    return dequantize_codes(codes, m.weight_scale, m.weight_min, m.bits, m.group_size, torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16,64,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--shapes", default=None, help="e.g. 1536x576,576x1536 (default: SmolLM2's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_kernel.extension() is not None, cpu_kernel.unavailable_reason()
    bw = bandwidth()
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s ({args.threads} threads)")
    rows = [int(r) for r in args.rows.split(",")]
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = []
    for out_f, in_f in shapes:
        for name, (build, dtype, exact) in make_paths(out_f, in_f, args.compile).items():
            if name == "compiled int4 g128" and out_f > 4096:
                continue
            try:
                fn0, nbytes = build()
                fns = [fn0] + [build()[0] for _ in range(copies_for(nbytes) - 1)]
            except Exception as e:  # noqa: BLE001 - a torch kernel missing on this build is a table entry
                results.append({"shape": f"{out_f}x{in_f}", "path": name, "error": f"{type(e).__name__}: {e}"[:120]})
                print(f"{out_f}x{in_f} {name}: unavailable ({type(e).__name__})")
                continue
            for m in rows:
                if (name == "compiled int4 g128" and m not in (1, 16)) or (out_f > 4096 and m > 16):
                    continue
                x = torch.randn(m, in_f, dtype=dtype)
                repeats = 400 if m * out_f * in_f < 2e7 else 40
                try:
                    with torch.no_grad():
                        t = median_time([(lambda f=f: f(x)) for f in fns], repeats)
                except Exception as e:  # noqa: BLE001
                    results.append(
                        {"shape": f"{out_f}x{in_f}", "path": name, "rows": m, "error": f"{type(e).__name__}: {e}"[:120]}
                    )
                    continue
                gbs = (nbytes + x.numel() * x.element_size()) / t / 1e9
                results.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "path": name,
                        "rows": m,
                        "us": t * 1e6,
                        "weight_bytes": nbytes,
                        "GB/s": gbs,
                        "bandwidth_share": gbs * 1e9 / bw,
                        "exact": exact,
                    }
                )
                print(f"{out_f}x{in_f} M={m:<4} {name:<22} {t * 1e6:9.1f} us  {gbs:6.1f} GB/s")
    fp = {(r["shape"], r["rows"]): r["us"] for r in results if r["path"] == "fp32" and "us" in r}
    lines = [
        f"Read bandwidth (sum of 512 MiB float32, {args.threads} threads): **{bw / 1e9:.1f} GB/s**.",
        "",
        "| shape (out x in) | rows | path | median us | weight MB | GB/s | share of bandwidth | vs fp32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r.get('rows', '')} | {r['path']} | unavailable: {r['error']} | | | | |")
            continue
        speed = fp[(r["shape"], r["rows"])] / r["us"]
        mark = "" if r["exact"] else " (activations quantized)"
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['path']}{mark} | {r['us']:.1f} | {r['weight_bytes'] / 1e6:.2f} | "
            f"{r['GB/s']:.1f} | {100 * r['bandwidth_share']:.0f} % | {speed:.2f}x |"
        )
    table = "\n".join(lines)
    res = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(res, "quant_kernels.md"), "w") as fh:
        fh.write(
            "# Quantized matmul paths on this CPU\n\n`PYTHONPATH=. python benchmarks/quant_kernels.py "
            + " ".join(sys.argv[1:])
            + "`\n\n"
            + table
            + "\n"
        )
    with open(os.path.join(res, "quant_kernels.json"), "w") as fh:
        json.dump({"bandwidth_bytes_per_s": bw, "threads": args.threads, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
