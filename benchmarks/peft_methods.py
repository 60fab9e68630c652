"""Parameter-efficient fine-tuning on the bundled SmolLM2-135M (CPU): one table, same data and steps.

    PYTHONPATH=. python benchmarks/peft_methods.py [--steps 30] [--methods all]

Every method trains from the same fp32 SmolLM2-135M-Instruct on the same KJV training rows (``--steps``
steps of ``--batch`` x 128 tokens, AdamW at the method's usual learning rate, constant) and is scored on
the same held-out KJV evaluation rows. Columns: trainable parameters, peak resident memory of the
training loop above the loaded model (weights, gradients, optimizer state, activations), seconds per
step, held-out perplexity before and after. The QLoRA and QA-LoRA rows then merge the adapter into the
4-bit base (``merge_and_unload``) with the default re-quantization (``refit``) and with a fresh
round-to-nearest grid (``rtn``, what a naive dequantize-merge-quantize does), and score the merged model
(a QA-LoRA adapter folds exactly into the group minima either way). Writes
``benchmarks/results/peft.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# this file is named peft.py: drop its folder from the path so `import peft` finds the library
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_efficiency  # noqa: E402,F401  (before peft: teaches peft our QuantLinear)
from hf_efficiency.demo import KJV_SPLITS, bundled_model_path, kjv_passages  # noqa: E402
from hf_efficiency.memory.measure import peak_memory_of  # noqa: E402

BLOCK = 128
BASE_PARAMETERS = 134_515_008  # SmolLM2-135M (tied embeddings counted once): the denominator of "trainable %"
OUT = Path(ROOT) / "benchmarks" / "results"


def blocks(tokenizer, passages: list[str], n_rows: int) -> torch.Tensor:
    """The first ``n_rows`` 128-token blocks of the concatenated passages."""
    ids: list[int] = []
    for p in passages:
        ids += tokenizer(p + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= (n_rows + 1) * BLOCK:
            break
    return torch.tensor(ids[: n_rows * BLOCK]).view(n_rows, BLOCK)


def held_out_perplexity(model, rows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean token loss) over the rows through ``labels`` (prompt tuning prepends virtual tokens, so
    the loss is what all methods share)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            x = rows[i : i + batch]
            total += float(model(input_ids=x, labels=x).loss) * len(x)
    return math.exp(total / len(rows))


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def weights_mib(model) -> float:
    """Storage of the model's parameters and buffers (a tied weight once), MiB."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return round(total / 2**20, 1)


def load(path, quantized: dict | None = None):
    kwargs = {} if quantized is None else {"efficiency_config": {"quantization": quantized}}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def build(name: str, path):
    """(model ready to train, learning rate) for a method."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    from hf_efficiency.peft.methods import apply_peft

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    if name == "full fine-tuning":
        return load(path), 5e-5
    if name == "LoRA r=16 all-linear":
        return get_peft_model(load(path), lora), 1e-3
    if name == "QLoRA r=16 all-linear, int4 g64":
        return get_peft_model(load(path, {"bits": 4, "group_size": 64}), lora), 1e-3
    if name == "QA-LoRA r=16 all-linear, int4 g64":
        qalora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", use_qalora=True, qalora_group_size=64
        )
        return get_peft_model(load(path, {"bits": 4, "group_size": 64}), qalora), 1e-3
    if name == "IA3 (k, v, down)":
        return get_peft_model(load(path), IA3Config(task_type="CAUSAL_LM")), 1e-2
    if name == "prompt tuning, 20 tokens":
        return get_peft_model(load(path), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)), 3e-2
    if name == "BitFit (added biases)":
        return apply_peft(load(path), {"method": "bitfit"}), 1e-3
    if name == "bottleneck adapters (Pfeiffer, 64)":
        return apply_peft(load(path), {"method": "adapters", "adapter_size": 64, "adapter_placement": "pfeiffer"}), 1e-3
    if name == "freeze lower 15 of 30 layers":
        return apply_peft(load(path), {"method": "freeze", "freeze_layers": 15}), 5e-5
    raise ValueError(f"unknown method {name!r}")


METHODS = [
    "full fine-tuning",
    "LoRA r=16 all-linear",
    "QLoRA r=16 all-linear, int4 g64",
    "QA-LoRA r=16 all-linear, int4 g64",
    "IA3 (k, v, down)",
    "prompt tuning, 20 tokens",
    "BitFit (added biases)",
    "bottleneck adapters (Pfeiffer, 64)",
    "freeze lower 15 of 30 layers",
]


def train(model, rows: torch.Tensor, lr: float, batch: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(len(rows) // batch):
        x = rows[step * batch : (step + 1) * batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def merged_perplexities(model, rows: torch.Tensor, methods=("refit", "rtn")) -> dict[str, float]:
    from hf_efficiency.peft.lora import QuantLoraLinear

    out = {}
    for method in methods:
        QuantLoraLinear.merge_method = method
        try:
            model.base_model.merge_adapter()
            out[method] = held_out_perplexity(model, rows)
            model.base_model.unmerge_adapter()
        finally:
            QuantLoraLinear.merge_method = "refit"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--methods", default="all", help="semicolon-separated subset of: " + "; ".join(METHODS))
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (two single-thread runs can share the 2 cores, each writing its rows)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = METHODS if args.methods == "all" else [m.strip() for m in args.methods.split(";")]
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    lo, hi = KJV_SPLITS["evaluation"]
    passages = kjv_passages()
    train_rows = blocks(tok, passages[:lo], args.steps * args.batch)
    eval_rows = blocks(tok, passages[lo:hi], args.eval_rows)
    settings = {
        "steps": args.steps,
        "batch": args.batch,
        "block": BLOCK,
        "eval_rows": args.eval_rows,
        "threads": args.threads,
    }
    md = ""
    for name in names:
        torch.manual_seed(0)
        model, lr = build(name, path)
        trainable = trainable_count(model)
        before = held_out_perplexity(model, eval_rows)
        _, peak, secs = peak_memory_of(lambda m=model, lr=lr: train(m, train_rows, lr, args.batch))
        row = {
            "method": name,
            "trainable": trainable,
            "trainable %": round(100 * trainable / BASE_PARAMETERS, 3),
            "lr": lr,
            "weights MiB": weights_mib(model),
            "peak MiB": round(peak / 2**20),
            "s/step": round(secs / args.steps, 2),
            "ppl before": round(before, 3),
            "ppl after": round(held_out_perplexity(model, eval_rows), 3),
        }
        if "QLoRA" in name or "QA-LoRA" in name:
            # a QA-LoRA delta folds into the minima whatever the re-quantization method: one merge suffices
            methods = ("refit",) if "QA-LoRA" in name else ("refit", "rtn")
            merged = merged_perplexities(model, eval_rows, methods)
            for k in methods:
                row[f"merged ppl ({k})"] = round(merged[k], 3)
                row[f"merged vs unmerged ({k})"] = f"{100 * (merged[k] / row['ppl after'] - 1):+.3f}%"
        print(row, flush=True)
        del model
        md = save_row(row, settings)
    print(md)


def save_row(row: dict, settings: dict) -> str:
    """Add one method's row to ``benchmarks/results/peft.{json,md}`` (re-read first: runs of other
    methods may share the file) and return the markdown."""
    previous = OUT / "peft.json"
    rows = {r["method"]: r for r in json.loads(previous.read_text())["rows"]} if previous.exists() else {}
    rows[row["method"]] = row
    ordered = [rows[m] for m in METHODS if m in rows]
    (OUT / "peft.json").write_text(json.dumps({"settings": settings, "rows": ordered}, indent=1))
    md = markdown(settings, ordered)
    (OUT / "peft.md").write_text(md)
    return md


def markdown(settings: dict, rows: list[dict]) -> str:
    keys = ["method", "trainable", "trainable %", "lr", "weights MiB", "peak MiB", "s/step", "ppl before", "ppl after"]
    lines = [
        f"SmolLM2-135M-Instruct fp32, {settings['steps']} steps x {settings['batch']} x {settings['block']} KJV "
        f"training tokens, AdamW (constant lr); held-out perplexity on {settings['eval_rows']} x "
        f"{settings['block']} KJV evaluation tokens; weights MiB: the model's parameters and buffers (packed for "
        "the 4-bit bases, adapters included); peak MiB: resident memory of the training loop above the "
        f"loaded model; {settings['threads']} CPU thread(s) per run.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    merged = [r for r in rows if "merged ppl (refit)" in r]
    if merged:
        keys = [
            "method",
            "ppl after",
            "merged ppl (refit)",
            "merged vs unmerged (refit)",
            "merged ppl (rtn)",
            "merged vs unmerged (rtn)",
        ]
        lines += [
            "",
            "LoRA merged into the 4-bit base (`merge_and_unload`): re-quantized with the module's scheme by "
            "`refit` (default) or a fresh round-to-nearest grid (`rtn`, the naive merge).",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in merged]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
