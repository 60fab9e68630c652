"""Sequential onloading on the bundled SmolLM2-135M: the folder ``quantize_sequential`` writes one layer at a time
equals ``from_pretrained(..., efficiency_config=) + save_pretrained`` tensor for tensor and in config.json.

    python benchmarks/sequential_vs_memory.py                 # GPTQ 4-bit g64, calibration 8 x 256
    python benchmarks/sequential_vs_memory.py --method awq --group-size 128

Prints one line: tensors compared, whether keys, bits and config are equal, and both wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_efficiency
from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import bundled_model_path


def tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args()
    src, out = bundled_model_path(), tempfile.mkdtemp()
    cfg = EfficiencyConfig(
        quantization={"method": args.method, "bits": args.bits, "group_size": args.group_size},
        calibration={"samples": args.samples, "sequence_length": args.length},
    )
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg, dtype=torch.float32).save_pretrained(out + "/mem")
    memory_s = time.perf_counter() - start
    start = time.perf_counter()
    hf_efficiency.quantize_sequential(src, cfg, out + "/seq", progress=False)
    sequential_s = time.perf_counter() - start
    a, b = tensors(out + "/mem"), tensors(out + "/seq")
    configs = [json.load(open(os.path.join(out, d, "config.json"))) for d in ("mem", "seq")]
    print(
        f"SmolLM2-135M {args.method} {args.bits}-bit g{args.group_size}: {len(a)} tensors, keys equal "
        f"{sorted(a) == sorted(b)}, bit-equal {sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)}, "
        f"config equal {configs[0] == configs[1]}; in memory {memory_s:.0f} s, sequential {sequential_s:.0f} s"
    )


if __name__ == "__main__":
    main()
