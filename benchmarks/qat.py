"""Quantization-aware training on the real model: SmolLM2-135M (fp32), 3 bits (group 64) and 2 bits (group 32).

    python benchmarks/qat.py                          # every experiment, writes results/qat.{md,json}
    python benchmarks/qat.py --only fp32 ptq-w3-g64 qat-w3-g64
    python benchmarks/qat.py --steps 20 --lr 1e-3 --eval-windows 4 --only qat-w3-g64 --results /tmp/scout.json

Defaults: 40 steps x 4 rows x 128 tokens, lr 3e-4. The learning rate was picked from scratch runs of
``qat-w3-g64`` for 20 steps (held-out perplexity on 4 x 512 tokens: lr 1e-4 33.2, 3e-4 26.8, 1e-3 34.2).

Every trained model starts from the same fp32 checkpoint and sees the same KJV rows (train slice,
128-token blocks, seeded order) for the same steps, batch, learning rate and schedule (AdamW, cosine
after a 10 % warmup, no weight decay, a stock `transformers.Trainer`). Held-out perplexity is on
windows of the KJV evaluation slice. Experiments (results are stored as they finish, so an
interrupted run resumes; --fresh to redo):

- fp32: the float model.
- ptq-S: post-training round-to-nearest (``from_pretrained(path, efficiency_config=...)``).
- qat-S: ``prepare_qat`` -> Trainer -> ``convert_qat``; evaluated as the packed `QuantLinear` model.
- finetune: the float model fine-tuned the same way (control: training on KJV lowers KJV perplexity
  by itself).
- finetune+ptq-S: that fine-tuned model, then round-to-nearest (control: train first, round after).
- finetune@LR: the float fine-tuning control at other learning rates (--control-lrs), so that QAT is
  also compared with the best float model the same data and steps give.

recovered = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_fp32); "vs fine-tuned" replaces ppl_fp32 by the
fine-tuned float model's perplexity (at the same learning rate, and the best of all control runs). The same ratios on log-perplexity (NLL) are reported too, since
at 2 bits the PTQ perplexity is so large that the perplexity ratio is close to 100 % for any model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout first, then benchmarks/ (the KJV rows of the distillation benchmark)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from distillation import BLOCK, Rows, blocks  # noqa: E402  (the same KJV rows as the distillation benchmark)
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_efficiency  # noqa: F401  (registers the quantizer)
from hf_efficiency import convert_qat, prepare_qat
from hf_efficiency.data import load_text, token_windows
from hf_efficiency.demo import KJV_SPLITS, bundled_model_path, kjv_passages
from hf_efficiency.evaluate import perplexity

RESULTS = Path(ROOT) / "benchmarks" / "results"
WORK = Path(os.environ.get("HF_EFFICIENCY_BENCH_DIR", "/tmp/hf_efficiency_qat_bench"))
SCHEMES = {
    "w3-g64": {"quantization": {"method": "rtn", "bits": 3, "group_size": 64, "symmetric": False}},
    "w2-g32": {"quantization": {"method": "rtn", "bits": 2, "group_size": 32, "symmetric": False}},
}
EXPERIMENTS = (
    "fp32",
    "ptq-w3-g64",
    "qat-w3-g64",
    "finetune",
    "finetune+ptq-w3-g64",
    "ptq-w2-g32",
    "qat-w2-g32",
    "finetune+ptq-w2-g32",
)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = {
            "steps": args.steps,
            "batch": args.batch,
            "block": BLOCK,
            "lr": args.lr,
            "eval_windows": args.eval_windows,
            "eval_window": args.eval_window,
        }
        self.json_path = Path(args.results)
        self.results: dict = {}
        if self.json_path.is_file():
            saved = json.loads(self.json_path.read_text())
            if saved.get("settings") == self.settings:
                self.results = saved.get("experiments", {})
        if args.fresh:  # redo the experiments named by --only (all without it)
            self.results = {k: v for k, v in self.results.items() if args.only and k not in args.only}
        self.path = bundled_model_path()
        self.tok = AutoTokenizer.from_pretrained(self.path)
        lo, _ = KJV_SPLITS["evaluation"]
        self.train_rows = blocks(self.tok, kjv_passages()[:lo], args.steps * args.batch, seed=0)
        self.eval_windows = token_windows(
            self.tok, load_text("kjv", "evaluation"), args.eval_window, args.eval_windows * args.eval_window
        )

    def record(self, name: str, row: dict) -> None:
        self.results[name] = row
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(
            json.dumps(
                {
                    "model": "SmolLM2-135M-Instruct (fp32)",
                    "settings": self.settings,
                    "torch_threads": torch.get_num_threads(),
                    "experiments": self.results,
                },
                indent=2,
            )
        )
        print(f"{name}: {row}", flush=True)

    def evaluate(self, model) -> dict:
        t0 = time.perf_counter()
        r = perplexity(model, self.eval_windows, batch_size=4, progress=False)
        return {
            "ppl": round(r["perplexity"], 3),
            "nll": round(r["nll"], 5),
            "eval_s": round(time.perf_counter() - t0, 1),
        }

    def float_model(self):
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)

    def train(self, model, name: str, lr: float | None = None) -> dict:
        a = self.args
        args = TrainingArguments(
            output_dir=str(WORK / name),
            per_device_train_batch_size=a.batch,
            max_steps=a.steps,
            learning_rate=lr or a.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, a.steps // 10),
            weight_decay=0.0,
            optim="adamw_torch",
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_steps=max(1, a.steps // 10),
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Rows(self.train_rows))
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        model.eval()
        return {
            "steps": a.steps,
            "train_s": round(wall, 1),
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
        }

    def run(self, name: str) -> None:
        if name in self.results:
            print(f"{name}: cached {self.results[name]}")
            return
        t0 = time.perf_counter()
        kind, _, scheme = name.partition("-")
        if name == "fp32":
            row = self.evaluate(self.float_model())
        elif name == "finetune":
            model = self.float_model()
            row = self.train(model, name)
            model.save_pretrained(WORK / "finetuned")
            (WORK / "finetuned" / "bench_settings.json").write_text(json.dumps(self.settings))
            row.update(self.evaluate(model))
        elif name.startswith("finetune@"):
            lr = float(name.partition("@")[2])
            model = self.float_model()
            row = {"lr": lr, **self.train(model, name, lr=lr)}
            row.update(self.evaluate(model))
        elif kind == "ptq":
            row = self.evaluate(AutoModelForCausalLM.from_pretrained(self.path, efficiency_config=SCHEMES[scheme]))
        elif kind == "finetune+ptq":
            stamp = WORK / "finetuned" / "bench_settings.json"
            if not stamp.is_file() or json.loads(stamp.read_text()) != self.settings:
                raise SystemExit(
                    f"{name} quantizes the fine-tuned model: run 'finetune' first (with the same settings)"
                )
            model = AutoModelForCausalLM.from_pretrained(WORK / "finetuned", efficiency_config=SCHEMES[scheme])
            row = self.evaluate(model)
        elif kind == "qat":
            model = prepare_qat(self.float_model(), SCHEMES[scheme])
            row = self.train(model, name)
            convert_qat(model)  # evaluate the real packed model
            row.update(self.evaluate(model))
        else:  # pragma: no cover - argparse restricts the names
            raise SystemExit(f"unknown experiment {name!r}")
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        self.record(name, row)
        gc.collect()


def recovered(ptq: float, model: float, reference: float) -> float:
    """Fraction of the PTQ loss (``ptq - reference``) that ``model`` wins back."""
    return (ptq - model) / (ptq - reference)


def controls(results: dict, settings: dict) -> dict[float, dict]:
    """The float fine-tuning controls by learning rate (``finetune`` is the one at the main lr)."""
    out = {float(k.partition("@")[2]): v for k, v in results.items() if k.startswith("finetune@")}
    if "finetune" in results:
        out[settings["lr"]] = results["finetune"]
    return dict(sorted(out.items()))


def summary(results: dict, settings: dict) -> dict:
    """Recovered fractions per scheme (perplexity and NLL based), when the runs needed exist."""
    out = {}
    fp, ft = results.get("fp32"), results.get("finetune")
    ctl = controls(results, settings)
    best_lr = min(ctl, key=lambda lr: ctl[lr]["nll"]) if ctl else None
    for s in SCHEMES:
        ptq, qat = results.get(f"ptq-{s}"), results.get(f"qat-{s}")
        if not (fp and ptq and qat):
            continue
        row = {
            "recovered": recovered(ptq["ppl"], qat["ppl"], fp["ppl"]),
            "recovered_nll": recovered(ptq["nll"], qat["nll"], fp["nll"]),
        }
        if ft:
            row["recovered_vs_finetuned"] = recovered(ptq["ppl"], qat["ppl"], ft["ppl"])
            row["recovered_nll_vs_finetuned"] = recovered(ptq["nll"], qat["nll"], ft["nll"])
        if best_lr is not None:
            best = ctl[best_lr]
            row["recovered_vs_best_finetuned"] = recovered(ptq["ppl"], qat["ppl"], best["ppl"])
            row["recovered_nll_vs_best_finetuned"] = recovered(ptq["nll"], qat["nll"], best["nll"])
        out[s] = {k: round(v, 4) for k, v in row.items()}
        if best_lr is not None:
            out[s]["best_finetuned_lr"] = best_lr
    return out


def markdown(results: dict, settings: dict) -> str:
    r, s = results, settings
    lines = [
        (
            f"SmolLM2-135M-Instruct, fp32, 2 CPU threads. Training: {s['steps']} steps x {s['batch']} rows x "
            f"{s['block']} tokens of the KJV train slice ({s['steps'] * s['batch'] * s['block']:,} tokens), AdamW lr "
            f"{s['lr']:g}, cosine after 10 % warmup, stock `transformers.Trainer`; the same rows, order and schedule "
            f"for QAT and the float fine-tuning controls. Held-out perplexity: {s['eval_windows']} x {s['eval_window']} "
            "tokens of the KJV evaluation slice. QAT is evaluated after `convert_qat` (packed `QuantLinear` model). "
            "recovered = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_ref), ref = fp32, or the float model fine-tuned at the "
            "same lr / at the best control lr; (NLL) = the same on log-perplexity. Train s: wall time on 2 cores "
            "shared with other jobs (contention varied)."
        ),
        "",
        (
            "| model | bits | group | train s | held-out perplexity | recovered vs fp32 | recovered vs fine-tuned float "
            "(same lr / best lr) | recovered (NLL) vs fp32 / fine-tuned (same / best) |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, key: str | None, bits: str, group: str, extra: str = "- | - | -", data: dict | None = None):
        data = data or r.get(key)
        if data:
            train = f"{data['train_s']:.0f}" if "train_s" in data else "-"
            lines.append(f"| {label} | {bits} | {group} | {train} | {data['ppl']:,.2f} | {extra} |")

    row("fp32", "fp32", "32", "-")
    for lr, data in controls(r, s).items():
        row(f"fp32 fine-tuned, lr {lr:g} (control)", None, "32", "-", data=data)
    rec = summary(r, s)
    for s_name, spec in SCHEMES.items():
        q = spec["quantization"]
        bits, group = str(q["bits"]), str(q["group_size"])
        row("RTN (post-training)", f"ptq-{s_name}", bits, group)
        row(f"fine-tuned float (lr {s['lr']:g}), then RTN (control)", f"finetune+ptq-{s_name}", bits, group)
        extra = "- | - | -"
        if s_name in rec:
            x = rec[s_name]

            def pct(key: str, x: dict = x) -> str:
                return f"{x[key]:.1%}" if key in x else "-"

            extra = (
                f"**{x['recovered']:.1%}** | {pct('recovered_vs_finetuned')} / {pct('recovered_vs_best_finetuned')}"
                f" | {pct('recovered_nll')} / {pct('recovered_nll_vs_finetuned')} / "
                f"{pct('recovered_nll_vs_best_finetuned')}"
            )
        row("**QAT** (`prepare_qat` -> Trainer -> `convert_qat`)", f"qat-{s_name}", bits, group, extra)
    return "\n".join(lines) + "\n"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument(
        "--control-lrs",
        type=float,
        nargs="*",
        default=[1e-5, 3e-5, 1e-4],
        help="more learning rates for the float fine-tuning control",
    )
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of {', '.join(EXPERIMENTS)}, finetune@LR")
    parser.add_argument("--results", default=str(RESULTS / "qat.json"), help="JSON file (the .md is written beside it)")
    parser.add_argument("--fresh", action="store_true", help="redo the --only experiments (all without it)")
    args = parser.parse_args()
    hf_logging.set_verbosity_warning()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    experiments = (*EXPERIMENTS, *(f"finetune@{lr:g}" for lr in args.control_lrs if lr != args.lr))
    for name in args.only or ():
        if name not in EXPERIMENTS and not (name.startswith("finetune@") and _is_float(name.partition("@")[2])):
            parser.error(f"--only {name!r} is not an experiment; allowed: {', '.join(EXPERIMENTS)}, finetune@LR")
    bench = Bench(args)
    for name in args.only or experiments:
        bench.run(name)
    md = markdown(bench.results, bench.settings)
    saved = json.loads(bench.json_path.read_text()) if bench.json_path.is_file() else {}
    saved["summary"] = summary(bench.results, bench.settings)
    bench.json_path.write_text(json.dumps(saved, indent=2))
    bench.json_path.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps(saved.get("summary", {}), indent=2))


if __name__ == "__main__":
    main()
