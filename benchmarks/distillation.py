"""Distillation on the real model: SmolLM2-135M (30 layers) teaches a 10-layer student copied from it.

    python benchmarks/distillation.py                 # all experiments, writes results/distillation.{md,json}
    python benchmarks/distillation.py --only label_only response_kd

Every student starts from the same `make_student(teacher, 10)` (teacher layers spread uniformly) and
trains on the same KJV rows (train slice, 128-token blocks, batch 8) for the same steps, learning rate
and schedule; held-out perplexity is on the KJV evaluation slice. Each experiment's result is stored in
the JSON as soon as it finishes, so an interrupted run resumes where it stopped (--fresh to redo).

Experiments:
- label_only: plain language-modelling loss (the baseline).
- response_kd: forward KL to the teacher's distribution, alpha 0.5.
- feature_kd: response_kd + cosine hidden-state matching of each student layer to the teacher layer it
  was copied from.
- relation_kd: response_kd + RKD distance/angle relations of pooled sequence representations.
- cached_kd: response_kd from a top-32 teacher cache (teacher not in memory while training; the
  caching time is reported apart).
- ensemble: the response_kd run's snapshots (steps/3, 2steps/3, steps) as a StudentEnsemble, mixture
  weights fitted by EM on a third KJV slice (neither train nor evaluation).
- ensemble_cycles: snapshot ensemble (Huang et al., 2017): the response_kd student continued for 3/4 of
  the steps from the teacher cache with 3 cosine cycles with hard restarts, a snapshot at each cycle end.
- mutual: two 10-layer students (uniform layers, and layers offset by one) trained together with deep
  mutual learning (label loss + 0.5 x KL from the peer, the weight ramped up over the first half);
  each is compared with itself trained alone (label_only and label_only_b).
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
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_efficiency.demo import KJV_SPLITS, bundled_model_path, kjv_passages  # noqa: E402
from hf_efficiency.distill import (  # noqa: E402
    DistillationTrainer,
    DistillationTrainingArguments,
    MutualDistillationTrainer,
    MutualDistillationTrainingArguments,
    StudentEnsemble,
    cache_teacher_logprobs,
    make_student,
)
from hf_efficiency.evaluate import perplexity as evaluate_perplexity  # noqa: E402

RESULTS = Path(ROOT) / "benchmarks" / "results"
WORK = Path(os.environ.get("HF_EFFICIENCY_BENCH_DIR", "/tmp/hf_efficiency_distill_bench"))
BLOCK, BATCH, LR = 128, 8, 1e-3
EVAL_ROWS, FIT_ROWS = 32, 16
MUTUAL_WEIGHT = 0.5
EXCHANGE_STEPS = 10
STUDENT_LAYERS = 10
EXPERIMENTS = (
    "teacher",
    "label_only",
    "response_kd",
    "feature_kd",
    "relation_kd",
    "cached_kd",
    "ensemble",
    "ensemble_cycles",
    "label_only_b",
    "mutual",
    "mutual_best",
)


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def blocks(tokenizer, passages: list[str], n_rows: int, seed: int | None = None) -> torch.Tensor:
    """``n_rows`` 128-token blocks of the concatenated passages (a seeded random choice if ``seed``)."""
    ids: list[int] = []
    need = (n_rows * 40 if seed is not None else n_rows + 1) * BLOCK
    for p in passages:
        ids += tokenizer(p + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    rows = torch.tensor(ids[: len(ids) // BLOCK * BLOCK]).view(-1, BLOCK)
    if seed is not None:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    if len(rows) < n_rows:
        raise ValueError(f"only {len(rows)} rows of text, need {n_rows}")
    return rows[:n_rows]


def perplexity(model, rows: torch.Tensor) -> float:
    """Held-out perplexity with the project's harness (each 128-token row scored alone)."""
    return evaluate_perplexity(model, rows, batch_size=8, progress=False)["perplexity"]


def distill_args(out: Path, steps: int, **kw) -> DistillationTrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=10,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return DistillationTrainingArguments(**base)


class Bench:
    def __init__(self, steps: int):
        self.steps = steps
        self.json_path = RESULTS / "distillation.json"
        self.results: dict = {}
        if self.json_path.is_file():
            saved = json.loads(self.json_path.read_text())
            if saved.get("steps") == steps:
                self.results = saved.get("experiments", {})
        self.tok = AutoTokenizer.from_pretrained(bundled_model_path())
        passages = kjv_passages()
        lo, hi = KJV_SPLITS["evaluation"]
        self.train_rows = blocks(self.tok, passages[:lo], steps * BATCH, seed=0)
        self.eval_rows = blocks(self.tok, passages[lo:hi], EVAL_ROWS)
        self.fit_rows = blocks(self.tok, passages[hi:], FIT_ROWS)
        self._teacher = None

    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = AutoModelForCausalLM.from_pretrained(bundled_model_path()).eval()
        return self._teacher

    def student(self, offset: int = 0):
        layers = [min(29, round(i * 29 / (STUDENT_LAYERS - 1)) + offset) for i in range(STUDENT_LAYERS)]
        if offset:
            layers = sorted(set(layers))
        return make_student(self.teacher, layers=layers)

    def record(self, name: str, row: dict) -> None:
        self.results[name] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(
            json.dumps(
                {
                    "steps": self.steps,
                    "batch": BATCH,
                    "block": BLOCK,
                    "lr": LR,
                    "student_layers": STUDENT_LAYERS,
                    "experiments": self.results,
                },
                indent=2,
            )
        )
        print(f"{name}: {row}", flush=True)

    def train(self, name: str, student, **kw) -> dict:
        out = WORK / name
        args = distill_args(out, self.steps, **kw)
        teacher = None if args.teacher_cache_dir else self.teacher
        trainer = DistillationTrainer(
            model=student,
            args=args,
            train_dataset=Rows(self.train_rows),
            data_collator=default_data_collator,
            teacher_model=teacher,
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        row = {
            "method": name,
            "steps": args.max_steps,
            "wall_s": round(wall, 1),
            "ppl": round(perplexity(student, self.eval_rows), 3),
            "train_loss_last": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        }
        return row

    def run(self, name: str) -> None:
        if name in self.results:
            print(f"{name}: cached {self.results[name]}")
            return
        getattr(self, f"exp_{name}")()
        gc.collect()

    # ---------------------------------------------------------------- experiments

    def exp_teacher(self) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(self.teacher, self.eval_rows)
        init = perplexity(self.student(), self.eval_rows)
        init_b = perplexity(self.student(offset=1), self.eval_rows)
        self.record(
            "teacher",
            {
                "method": "teacher (30 layers)",
                "ppl": round(ppl, 3),
                "student_init_ppl": round(init, 3),
                "student_b_init_ppl": round(init_b, 3),
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        )

    def exp_label_only(self) -> None:
        self.record("label_only", self.train("label_only", self.student(), alpha=0.0))

    def exp_label_only_b(self) -> None:
        self.record("label_only_b", self.train("label_only_b", self.student(offset=1), alpha=0.0))

    def exp_response_kd(self) -> None:
        every = self.steps // 3
        row = self.train("response_kd", self.student(), alpha=0.5, snapshot_strategy="steps", snapshot_steps=every)
        self.record("response_kd", row)

    def exp_feature_kd(self) -> None:
        self.record(
            "feature_kd", self.train("feature_kd", self.student(), alpha=0.5, feature_weight=1.0, feature_loss="cosine")
        )

    def exp_relation_kd(self) -> None:
        self.record(
            "relation_kd",
            self.train(
                "relation_kd", self.student(), alpha=0.5, relation_weight=1.0, relation_losses="rkd_distance,rkd_angle"
            ),
        )

    def exp_cached_kd(self) -> None:
        cache = WORK / "teacher_cache"
        t0 = time.perf_counter()
        cache_teacher_logprobs(self.teacher, Rows(self.train_rows), cache, top_k=32, batch_size=8, show_progress=False)
        cache_s = time.perf_counter() - t0
        self._teacher = None
        gc.collect()
        row = self.train("cached_kd", self.student_without_teacher(), alpha=0.5, teacher_cache_dir=str(cache))
        row["cache_s"] = round(cache_s, 1)
        row["cache_mb"] = round(sum(f.stat().st_size for f in cache.iterdir()) / 2**20, 1)
        self.record("cached_kd", row)

    def student_without_teacher(self):
        s = self.student()
        self._teacher = None
        return s

    def _ensemble_row(self, snaps: Path, label: str, steps: int) -> dict:
        t0 = time.perf_counter()
        ens = StudentEnsemble.from_snapshots(snaps, last=3)
        members = [perplexity(m, self.eval_rows) for m in ens.members]
        uniform = perplexity(ens, self.eval_rows)
        weights = ens.fit_weights(self.fit_rows)
        fitted = perplexity(ens, self.eval_rows)
        return {
            "method": label,
            "steps": steps,
            "member_ppl": [round(p, 3) for p in members],
            "uniform_ppl": round(uniform, 3),
            "fitted_weights": [round(w, 3) for w in weights],
            "ppl": round(fitted, 3),
            "last_snapshot_ppl": round(members[-1], 3),
            "wall_s": round(time.perf_counter() - t0, 1),
        }

    def exp_ensemble(self) -> None:
        snaps = WORK / "response_kd" / "snapshots"
        if not snaps.is_dir():
            raise SystemExit("ensemble needs the response_kd snapshots: run response_kd first (with --fresh)")
        self.record("ensemble", self._ensemble_row(snaps, "StudentEnsemble of 3 response_kd snapshots", self.steps))

    def exp_ensemble_cycles(self) -> None:
        """Snapshot ensemble in the sense of Huang et al. (2017): continue the response-KD student (from
        the teacher cache) for 3 cosine cycles with hard restarts, one snapshot at the end of each cycle."""
        start = WORK / "response_kd" / "snapshots" / f"snapshot-{self.steps:06d}"
        cache = WORK / "teacher_cache"
        if not start.is_dir() or not cache.is_dir():
            raise SystemExit("ensemble_cycles continues response_kd from the cached_kd teacher cache: run both first")
        steps = self.steps * 3 // 4
        student = AutoModelForCausalLM.from_pretrained(start)
        row = self.train(
            "ensemble_cycles",
            student,
            alpha=0.5,
            teacher_cache_dir=str(cache),
            max_steps=steps,
            learning_rate=LR / 2,
            lr_scheduler_type="cosine_with_restarts",
            lr_scheduler_kwargs={"num_cycles": 3},
            warmup_steps=0,
            snapshot_strategy="steps",
            snapshot_steps=steps // 3,
        )
        ens = self._ensemble_row(
            WORK / "ensemble_cycles" / "snapshots", "StudentEnsemble of 3 cyclic-LR snapshots", steps
        )
        ens["train_wall_s"] = row["wall_s"]
        self.record("ensemble_cycles", ens)

    def _mutual(self, name: str, **kw) -> None:
        a, b = self.student(), self.student(offset=1)
        self._teacher = None
        args = MutualDistillationTrainingArguments(
            output_dir=str(WORK / name),
            per_device_train_batch_size=BATCH,
            max_steps=self.steps,
            learning_rate=LR,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, self.steps // 10),
            weight_decay=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_steps=10,
            seed=0,
            disable_tqdm=True,
            **kw,
        )
        trainer = MutualDistillationTrainer(
            [a, b], args, train_dataset=Rows(self.train_rows), data_collator=default_data_collator
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        self.record(
            name,
            {
                "method": name,
                "steps": self.steps,
                "wall_s": round(wall, 1),
                "ppl_a": round(perplexity(a, self.eval_rows), 3),
                "ppl_b": round(perplexity(b, self.eval_rows), 3),
                "best_index": trainer.best_index,
            },
        )

    def exp_mutual(self) -> None:
        self._mutual("mutual", mutual_mode="dml", mutual_weight=MUTUAL_WEIGHT, mutual_warmup_steps=self.steps // 2)

    def exp_mutual_best(self) -> None:
        self._mutual("mutual_best", mutual_mode="best", mutual_weight=1.0, exchange_steps=EXCHANGE_STEPS)


def markdown(results: dict, steps: int) -> str:
    r = results
    lines = [
        f"SmolLM2-135M teacher -> 10-layer student copied from it; KJV, {steps} steps x {BATCH} rows x "
        f"{BLOCK} tokens, AdamW lr {LR} cosine; held-out perplexity on {EVAL_ROWS} x {BLOCK} KJV evaluation "
        "tokens; 2 CPU cores.",
        "",
        "| method | steps | wall time (s) | held-out perplexity |",
        "|---|---:|---:|---:|",
    ]
    if "teacher" in r:
        lines.append(f"| teacher (30 layers) | - | - | {r['teacher']['ppl']:.2f} |")
        lines.append(
            f"| student at initialization (10 copied layers) | 0 | - | {r['teacher']['student_init_ppl']:,.0f} |"
        )
    names = {
        "label_only": "label-only (alpha 0)",
        "response_kd": "response KD (forward KL, alpha 0.5)",
        "feature_kd": "response + feature KD (cosine, copied-layer map)",
        "relation_kd": "response + relation KD (RKD distance + angle)",
        "cached_kd": "response KD from a top-32 teacher cache",
    }
    for k, label in names.items():
        if k in r:
            extra = f" (+{r[k]['cache_s']:.0f} s caching once, {r[k]['cache_mb']} MB)" if k == "cached_kd" else ""
            lines.append(f"| {label} | {r[k]['steps']} | {r[k]['wall_s']:.0f}{extra} | {r[k]['ppl']:.2f} |")
    if "ensemble" in r:
        e = r["ensemble"]
        lines.append(
            f"| StudentEnsemble of the response-KD snapshots (EM weights {e['fitted_weights']}) | "
            f"{e['steps']} | {e['wall_s']:.0f} (eval + fit) | {e['ppl']:.2f} |"
        )
        lines.append(
            f"| ... its snapshots alone (last = the response-KD student) | - | - | "
            f"{' / '.join(f'{p:.2f}' for p in e['member_ppl'])} |"
        )
        lines.append(f"| ... uniform weights | - | - | {e['uniform_ppl']:.2f} |")
    if "ensemble_cycles" in r:
        e = r["ensemble_cycles"]
        lines.append(
            f"| response-KD student continued {e['steps']} steps from the teacher cache, 3 cosine cycles "
            f"with restarts (lr {LR / 2:g}) | {e['steps']} | {e['train_wall_s']:.0f} | "
            f"{e['last_snapshot_ppl']:.2f} |"
        )
        lines.append(
            f"| StudentEnsemble of its 3 cycle-end snapshots (EM weights {e['fitted_weights']}) | - | "
            f"{e['wall_s']:.0f} (eval + fit) | {e['ppl']:.2f} |"
        )
        lines.append(
            f"| ... its snapshots alone / uniform weights | - | - | "
            f"{' / '.join(f'{p:.2f}' for p in e['member_ppl'])} / {e['uniform_ppl']:.2f} |"
        )
    if "mutual" in r:
        m = r["mutual"]
        lines.append(
            f"| mutual learning (DML: label loss + {MUTUAL_WEIGHT} x peer KL, ramped over the first "
            f"{m['steps'] // 2} steps), student A / B | {m['steps']} | {m['wall_s']:.0f} (both) | "
            f"{m['ppl_a']:.2f} / {m['ppl_b']:.2f} |"
        )
    if "mutual_best" in r:
        m = r["mutual_best"]
        lines.append(
            f"| mutual, 'best' mode (every {EXCHANGE_STEPS} steps the student with the lower training loss "
            f"teaches the other: label loss + 1.0 x KL), student A / B | {m['steps']} | "
            f"{m['wall_s']:.0f} (both) | {m['ppl_a']:.2f} / {m['ppl_b']:.2f} |"
        )
    if "mutual" in r or "mutual_best" in r:
        if "label_only" in r and "label_only_b" in r:
            lines.append(
                f"| ... A / B trained alone (label-only) | {r['label_only']['steps']} | "
                f"{r['label_only']['wall_s'] + r['label_only_b']['wall_s']:.0f} (both) | "
                f"{r['label_only']['ppl']:.2f} / {r['label_only_b']['ppl']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS, default=None)
    parser.add_argument("--fresh", action="store_true", help="ignore stored results")
    args = parser.parse_args()
    hf_logging.set_verbosity_warning()
    torch.manual_seed(0)
    bench = Bench(args.steps)
    if args.fresh and args.only:
        for name in args.only:
            bench.results.pop(name, None)
    elif args.fresh:
        bench.results = {}
    for name in args.only or EXPERIMENTS:
        bench.run(name)
    md = markdown(bench.results, args.steps)
    (RESULTS / "distillation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
