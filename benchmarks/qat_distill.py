"""Distillation-aware QAT at 2 bits (group 32) on SmolLM2-135M, in a fixed wall-clock budget.

    python benchmarks/qat_distill.py                       # 60 minutes in all, writes results/qat_distill.{md,json}
    python benchmarks/qat_distill.py --minutes 20 --init gptq --lr 5e-5

The recipe (every piece is public API):

1. post-training quantization as the starting point: ``from_pretrained(..., efficiency_config=...)`` with
   ``--init`` (``gptq``: act-order, integer zero points; ``autoround``; ``rtn``), then its de-quantized
   weights as a float model (every group's weights already on its grid, so round-to-nearest of them gives
   the same codes back);
2. ``prepare_qat`` (2 bits, group 32, integer zero points) on that model: the student;
3. ``DistillationTrainer`` with the float model as the frozen teacher: forward KL on the logits
   (``alpha=1``: the KD loss only) plus, with ``--feature-weight``, MSE between hidden states, on KJV
   training rows (128 tokens) until the budget is spent (``max_steps`` set from a timed first step);
4. ``convert_qat``: the packed model, evaluated on the KJV evaluation slice (32 x 512, as
   ``benchmarks/quantization.py``) against the float model measured in the same run.

The budget counts everything from loading the float model to the converted model (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from distillation import BLOCK, Rows, blocks  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

import hf_efficiency  # noqa: E402,F401
from hf_efficiency import EfficiencyConfig, convert_qat, prepare_qat  # noqa: E402
from hf_efficiency.data import load_text, token_windows  # noqa: E402
from hf_efficiency.demo import KJV_SPLITS, bundled_model_path, kjv_passages  # noqa: E402
from hf_efficiency.distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402
from hf_efficiency.evaluate import perplexity  # noqa: E402

RESULTS = Path(ROOT) / "benchmarks" / "results"
CAL = {"dataset": "kjv", "samples": 32, "sequence_length": 512}


def scheme(bits: int, group: int) -> dict:
    return {"method": "rtn", "bits": bits, "group_size": group, "zero_point": "integer"}


def init_config(init: str, bits: int, group: int) -> EfficiencyConfig:
    q = {**scheme(bits, group), "method": init}
    if init == "gptq":
        q["gptq"] = {"act_order": True}
    return EfficiencyConfig(quantization=q, calibration=CAL if init != "rtn" else None)


class Deadline(TrainerCallback):
    """Stop training when the wall-clock deadline passes."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() > self.deadline:
            control.should_training_stop = True
        return control


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--init", default="gptq", choices=["gptq", "autoround", "rtn"])
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--feature-weight", type=float, default=0.0)
    ap.add_argument("--max-steps", type=int, default=100000, help="upper bound; the deadline usually stops first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "qat_distill"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    deadline = time.perf_counter() + 60.0 * args.minutes
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, load_text("kjv", "evaluation"), 512, 16384)
    lo, _ = KJV_SPLITS["evaluation"]
    rows = blocks(tok, kjv_passages()[:lo], 6000, seed=1)  # 768k tokens, more than the budget reaches

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    ptq = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, efficiency_config=init_config(args.init, args.bits, args.group)
    )
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ptq_ppl = perplexity(ptq, windows, progress=False)["perplexity"]
    deadline += time.perf_counter() - t0  # evaluation is not part of the budget
    ptq = ptq.dequantize()  # transformers' API: float nn.Linear modules holding the de-quantized weights
    student = prepare_qat(ptq, {"quantization": scheme(args.bits, args.group)})
    student.train()

    train_args = DistillationTrainingArguments(
        output_dir="/tmp/hf_efficiency_qat_distill",
        per_device_train_batch_size=args.batch,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=20,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=20,
        seed=0,
        disable_tqdm=True,
        alpha=1.0,
        distill_loss="forward_kl",
        feature_weight=args.feature_weight,
    )
    trainer = DistillationTrainer(
        model=student,
        args=train_args,
        train_dataset=Rows(rows),
        teacher_model=teacher,
        callbacks=[Deadline(deadline)],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model = convert_qat(
        student, training=f"distilled from the float model (forward KL) on {steps * args.batch * BLOCK} KJV tokens"
    )
    total_s = init_s + train_s
    row = {
        "bits": args.bits,
        "group": args.group,
        "init": args.init,
        "lr": args.lr,
        "batch": args.batch,
        "block": BLOCK,
        "feature_weight": args.feature_weight,
        "steps": steps,
        "train_tokens": steps * args.batch * BLOCK,
        "init_s": round(init_s, 1),
        "train_s": round(train_s, 1),
        "total_s": round(total_s, 1),
        "ptq_perplexity": ptq_ppl,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    row["qat_perplexity"] = perplexity(model, windows, progress=False)["perplexity"]
    row["fp32_perplexity"] = perplexity(teacher, windows, progress=False)["perplexity"]
    row["ratio_to_fp32"] = row["qat_perplexity"] / row["fp32_perplexity"]
    print(json.dumps(row), flush=True)
    Path(args.out + ".json").write_text(json.dumps({"threads": args.threads, "rows": [row]}, indent=2))
    text = (
        "SmolLM2-135M-Instruct, 2 CPU threads. Distillation-aware QAT (float teacher, forward KL), "
        f"{args.bits}-bit group {args.group}, integer zero points; perplexity on the KJV evaluation slice "
        "(32 x 512).\n\n"
        "| init | steps | train tokens | init s | train s | PTQ perplexity | QAT perplexity | fp32 | QAT / fp32 |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.init} | {steps} | {row['train_tokens']} | {row['init_s']} | {row['train_s']} | "
        f"{ptq_ppl:.2f} | {row['qat_perplexity']:.2f} | {row['fp32_perplexity']:.3f} | {row['ratio_to_fp32']:.2f}x |\n"
    )
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
