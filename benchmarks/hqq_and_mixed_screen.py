"""Two design measurements on the bundled SmolLM2-135M (quick: 8 evaluation windows).

1. HQQ's scale step: perplexity after round-to-nearest, HQQ zero-point only (the default) and HQQ
   zero point + least-squares scale step (``hqq_optimize_scale``), 3 bits, group 64.
2. The sensitivity measure of automatic mixed precision: allocations to 3.0 mean bits from
   {2, 3, 4} (HQQ, group 64) driven by absolute versus relative (noise-to-signal) activation-
   weighted errors, against uniform 3 and 4 bits.

    python benchmarks/hqq_and_mixed_screen.py      # ~6 minutes on 2 cores

Writes benchmarks/results/hqq_and_mixed_screen.md.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch  # noqa: E402

from hf_efficiency.data import token_windows  # noqa: E402
from hf_efficiency.demo import bundled_model_path, kjv_text  # noqa: E402
from hf_efficiency.evaluate import perplexity  # noqa: E402
from hf_efficiency.quant.calibrated.capture import collect_model_input_rms  # noqa: E402
from hf_efficiency.quant.core.mixed import allocate_bits, mean_bits  # noqa: E402
from hf_efficiency.quant.core.scheme import quantize_weight  # noqa: E402
from hf_efficiency.quant.methods.hqq import hqq_quantize  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, kjv_text("evaluation"), 512, 4096)
    calibration = token_windows(tok, kjv_text("calibration"), 512, 4096)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    weights = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }

    def ppl_with(new: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for n, w in new.items():
                model.get_submodule(n).weight.copy_(w)
        return perplexity(model, windows, progress=False)["perplexity"]

    lines = ["Bundled SmolLM2-135M-Instruct, perplexity on 8 x 512 tokens of the KJV evaluation slice.", ""]
    lines += ["## HQQ scale step (3 bits, group 64)", "", "| variant | perplexity |", "|---|---|"]
    variants = {
        "round-to-nearest (min/max)": lambda w: quantize_weight(w, 3, 64, False).dequantize(),
        "HQQ zero point only (default)": lambda w: hqq_quantize(w, 3, 64).dequantize(),
        "HQQ zero point + scale (hqq_optimize_scale)": lambda w: hqq_quantize(
            w, 3, 64, optimize_scale=True
        ).dequantize(),
    }
    for name, fn in variants.items():
        p = ppl_with({n: fn(w) for n, w in weights.items()})
        lines.append(f"| {name} | {p:.2f} |")
        print(lines[-1], flush=True)

    rms = collect_model_input_rms(
        model.__class__.from_pretrained(path, dtype=torch.float32).eval(), calibration, list(weights), 4
    )
    deq = {(n, b): hqq_quantize(w, b, 64).dequantize() for n, w in weights.items() for b in (2, 3, 4)}
    sizes = {n: w.numel() for n, w in weights.items()}
    h = {n: rms[n].pow(2) for n in weights}
    absolute = {n: {b: float(((w - deq[n, b]).pow(2) * h[n]).sum()) for b in (2, 3, 4)} for n, w in weights.items()}
    relative = {n: {b: e / float((w.pow(2) * h[n]).sum()) for b, e in absolute[n].items()} for n, w in weights.items()}
    lines += [
        "",
        "## Mixed-precision sensitivity measure (HQQ, group 64)",
        "",
        "| allocation | mean code bits | modules at 2/3/4 bits | perplexity |",
        "|---|---|---|---|",
    ]
    allocations = {
        "uniform 3 bits": {n: 3 for n in weights},
        "absolute error, {2,3,4} -> 3.0": allocate_bits(sizes, absolute, [2, 3, 4], 3.0),
        "relative error (used), {2,3,4} -> 3.0": allocate_bits(sizes, relative, [2, 3, 4], 3.0),
        "uniform 4 bits": {n: 4 for n in weights},
    }
    for name, alloc in allocations.items():
        count = Counter(alloc.values())
        p = ppl_with({n: deq[n, alloc[n]] for n in weights})
        lines.append(f"| {name} | {mean_bits(alloc, sizes):.3f} | {count[2]}/{count[3]}/{count[4]} | {p:.2f} |")
        print(lines[-1], flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "hqq_and_mixed_screen.md")
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
