"""Fingerprint SmolLM2 logits for every row of the quantization table, to prove a refactor
changed no number.

    python benchmarks/logit_fingerprint.py --out /tmp/before.json          # on the old checkout
    python benchmarks/logit_fingerprint.py --out /tmp/after.json           # on the new one
    python benchmarks/logit_fingerprint.py --compare /tmp/before.json /tmp/after.json

For each scheme of ``benchmarks/quantization.py`` (calibration shortened to 8 windows x 128
tokens so the whole table runs in minutes; the comparison needs the same settings on both sides,
not the published ones) it quantizes the bundled model, then records the SHA-256 of the fp32
logits for a 7-token prompt (the fused CPU kernel's path, <= 16 rows) and a 2 x 64-token batch
(the de-quantize-then-matmul path), and of every tensor in the state dict. ``--compare`` prints one
line per scheme and exits non-zero when any differ.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def _sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def fingerprint(schemes: list[str], out: str) -> None:
    from quantization import SCHEMES  # the README table's rows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_efficiency  # noqa: F401
    from hf_efficiency import EfficiencyConfig

    try:
        from hf_efficiency.demo import resolve_model_path  # after the refactor
    except ImportError:
        from hf_efficiency.data import resolve_model_path  # before it

    torch.manual_seed(0)
    torch.set_num_threads(2)
    path = resolve_model_path(None)
    tok = AutoTokenizer.from_pretrained(path)
    short = tok("In the beginning God created", return_tensors="pt").input_ids[:, :7]
    g = torch.Generator().manual_seed(0)
    long = torch.randint(0, tok.vocab_size, (2, 64), generator=g)
    result: dict[str, dict] = {}
    if os.path.exists(out):
        with open(out) as fh:
            result = json.load(fh)
    for name in schemes:
        if name in result:
            continue
        cfg = copy.deepcopy(SCHEMES[name])
        kwargs = {"dtype": torch.float32}
        if cfg is not None:
            if "calibration" in cfg:
                cfg["calibration"] = {"dataset": "kjv", "samples": 8, "sequence_length": 128}
            kwargs["efficiency_config"] = EfficiencyConfig(**cfg)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        with torch.no_grad():
            row = {
                "short": _sha(model(short).logits),
                "long": _sha(model(long).logits),
                "state": _sha(torch.tensor([int(_sha(v), 16) % (1 << 62) for v in model.state_dict().values()])),
            }
        result[name] = row
        print(name, row, flush=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        del model


def compare(a: str, b: str) -> int:
    with open(a) as fh:
        left = json.load(fh)
    with open(b) as fh:
        right = json.load(fh)
    bad = 0
    for name in left:
        same = left[name] == right.get(name)
        bad += not same
        print(f"{name:32s} {'identical' if same else 'DIFFERENT'}  {left[name]}")
    print(f"{len(left) - bad} of {len(left)} schemes bit-identical")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="logit_fingerprint.json")
    ap.add_argument("--schemes", nargs="*", default=None)
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    from quantization import SCHEMES

    fingerprint(args.schemes or list(SCHEMES), args.out)


if __name__ == "__main__":
    main()
