"""Loading the bundled SmolLM2-135M GGUF (Q4_1) three ways, each in a fresh process (CPU):

* transformers' own GGUF support (de-quantizes every tensor to float32);
* ``hf_efficiency.load_gguf`` (keeps the file's codes in our 4-bit modules);
* plain ``from_pretrained`` of the folder ``hf-efficiency convert`` wrote.

    PYTHONPATH=. python benchmarks/formats.py

Per way: load seconds (median of 3 processes), peak resident memory of the process (max RSS, includes
torch itself), bytes of the decoder-layer linear weights in memory and their bits per weight, and the
largest logit difference to transformers' load on 2 x 128 tokens of the KJV evaluation slice.
Writes ``benchmarks/results/formats.{md,json}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
import hf_efficiency
from transformers import AutoModelForCausalLM
from hf_efficiency.demo import bundled_gguf_path
from hf_efficiency.quant.modules.linear import QuantLinear
way, out, ids_file = sys.argv[1], sys.argv[2], sys.argv[3]
p = bundled_gguf_path()
start = time.perf_counter()
if way == "transformers":
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
elif way == "load_gguf":
    model = hf_efficiency.load_gguf(p)
else:
    model = AutoModelForCausalLM.from_pretrained(out)
seconds = time.perf_counter() - start
layer_bytes = params = 0
for m in model.model.layers.modules():
    if isinstance(m, QuantLinear):
        tensors = (m.weight, m.weight_scale, m.weight_min, getattr(m, "weight_zero", None))
        layer_bytes += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        params += m.in_features * m.out_features
    elif isinstance(m, torch.nn.Linear):
        layer_bytes += m.weight.numel() * m.weight.element_size()
        params += m.weight.numel()
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
torch.save(logits, ids_file + "." + way)
print(json.dumps({"seconds": seconds, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "layer_bytes": layer_bytes, "bits_per_weight": 8 * layer_bytes / params}))
"""

WAYS = {
    "transformers": "transformers GGUF (de-quantized fp32)",
    "load_gguf": "hf_efficiency.load_gguf",
    "converted": "from_pretrained(converted folder)",
}


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from hf_efficiency.data import load_text, token_windows
    from hf_efficiency.demo import bundled_model_path

    tmp = tempfile.mkdtemp()
    out = os.path.join(tmp, "converted")
    subprocess.run(
        [sys.executable, "-m", "hf_efficiency.cli", "convert", "--out", out],
        check=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
    )
    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    ids_file = os.path.join(tmp, "ids.pt")
    torch.save(token_windows(tok, load_text("kjv", "evaluation"), 128, 256), ids_file)
    rows = []
    for way, label in WAYS.items():
        runs = []
        for _ in range(3):
            r = subprocess.run(
                [sys.executable, "-c", CHILD, way, out, ids_file],
                check=True,
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=ROOT),
            )
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        ref = torch.load(ids_file + ".transformers")
        diff = (torch.load(ids_file + "." + way) - ref).abs().max().item()
        rows.append(
            {
                "way": label,
                "seconds": statistics.median(x["seconds"] for x in runs),
                "max_rss_mb": statistics.median(x["max_rss"] for x in runs) / 2**20,
                "layer_mb": runs[0]["layer_bytes"] / 2**20,
                "bits_per_weight": runs[0]["bits_per_weight"],
                "max_logit_diff": diff,
            }
        )
    lines = [
        (
            "| load | seconds (median of 3) | peak RSS MiB | decoder-layer linear MiB | bits/weight | "
            "max logit diff vs transformers |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['seconds']:.2f} | {r['max_rss_mb']:.0f} | {r['layer_mb']:.1f} | "
            f"{r['bits_per_weight']:.2f} | {r['max_logit_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    res = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(res, "formats.md"), "w") as fh:
        fh.write(
            "# Loading SmolLM2-135M-Instruct.Q4_1.gguf (2 CPU threads)\n\n`PYTHONPATH=. python benchmarks/formats.py`"
            "\n\n" + table + "\n"
        )
    with open(os.path.join(res, "formats.json"), "w") as fh:
        json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
