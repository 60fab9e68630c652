"""One prepared run on a lent CUDA machine: every CUDA path of hf-efficiency checked against the CPU
reference, and timed.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR        # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke          # here, on CPU: tiny shapes, no timing claims

Sections (each recorded on its own; a failure is written down and the next section runs):

1. kernels: `QuantLinear` on CUDA (int8 per-channel -> ``_weight_int8pack_mm``, int4 g32/g128 ->
   tinygemm ``_weight_int4pack_mm``, W8A8 -> ``_int_mm``, other 4/8-bit formats -> the Triton kernel
   ``cuda_triton`` when triton imports, anything else -> dequantize) against the CPU float32 reference;
   time per call (CUDA events, median) and effective GB/s of weight traffic for M = 1, 16, 512 rows, beside
   bf16 ``F.linear``. Then, for M = 1 and 16, every 4/8-bit scheme forced through the Triton kernel
   (``HF_EFFICIENCY_KERNEL=cuda_triton``, path ``cuda_triton (forced)``) beside the torch kernels' rows, and
   torchao's int4 weight-only linear (``Int4WeightOnlyConfig``) when torchao imports (else one row saying so).
2. decode: greedy tokens/s of a SmolLM2-135M-shaped and a 1.1B Llama-shaped model (random weights:
   the real checkpoints cannot travel to the machine) in bf16, int8 and int4.
3. speculative: greedy identity on CUDA (batch 1 and a left-padded batch of 4) for each draft kind,
   and wall-clock of plain greedy, ours and transformers' assisted generation with the same draft.
   Random weights make acceptance rates meaningless; the timings show the per-step costs.
4. memory: `measure_memory` (torch.cuda.max_memory_allocated) against `estimate_memory` for
   inference and a full fine-tuning step on the SmolLM2 shape.
5. distillation: three `DistillationTrainer` steps on CUDA (device placement of teacher/student).

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_efficiency  # noqa: E402
from hf_efficiency.quant import QuantLinear  # noqa: E402
from hf_efficiency.quant.kernels import triton_kernels  # noqa: E402
from hf_efficiency.speculative.slots import left_pad  # noqa: E402

SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
)
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=512,
)


def timed(fn, device: str, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def section_kernels(device: str, smoke: bool) -> list[dict]:
    shapes = (
        [(64, 128)] if smoke else [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
    )
    schemes = [
        ("int8", 8, None, True, None),
        ("int4-g128", 4, 128, False, None),
        ("int4-g32", 4, 32, False, None),
        ("int4-g128-sym", 4, 128, True, None),
        ("int3-g128", 3, 128, False, None),
        ("int8-asym", 8, None, False, None),
        ("int8-g128", 8, 128, True, None),
        ("w8a8-dynamic", 8, None, True, "dynamic"),
    ]
    # the Triton kernel on CUDA, or on CPU in Triton's interpreter (TRITON_INTERPRET=1: checks the code, no timing claims)
    triton_runs = triton_kernels.triton_available() and (device == "cuda" or triton_kernels.interpreting())
    rows = []
    g = torch.Generator().manual_seed(0)
    ms = (1, 16, 512)
    for out_f, in_f in shapes:
        linear = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * in_f**-0.5)
        dense = linear.weight.detach().to(device, torch.bfloat16)
        xs = {m: torch.randn(m, in_f, generator=g) for m in ms}
        xds = {m: x.to(device, torch.bfloat16) for m, x in xs.items()}
        base = {m: timed(lambda m=m: F.linear(xds[m], dense), device) for m in ms}
        for m in ms:
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}",
                    "m": m,
                    "scheme": "bf16",
                    "path": "F.linear",
                    "us": round(base[m] * 1e6, 2),
                    "GB/s": round(2 * out_f * in_f / base[m] / 1e9, 1),
                    "rel_err": 0.0,
                    "vs_bf16": 1.0,
                }
            )
        for name, bits, group, sym, act in schemes:
            q = QuantLinear.from_linear(linear, bits=bits, group_size=group, symmetric=sym)
            if act:
                q.act_mode = act
            refs = {m: q(x).float() for m, x in xs.items()}  # CPU reference (float32 input)
            q = q.to(device)
            for m in ms:
                y = q(xds[m])
                err = float((y.float().cpu() - refs[m]).abs().max() / refs[m].abs().max())
                t = timed(lambda m=m: q(xds[m]), device)
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "m": m,
                        "scheme": name,
                        "path": getattr(q, "last_path", "w8a8"),
                        "us": round(t * 1e6, 2),
                        "GB/s": round(out_f * in_f * bits / 8 / t / 1e9, 1),
                        "rel_err": round(err, 5),
                        "vs_bf16": round(base[m] / t, 3),
                    }
                )
            if act or bits not in triton_kernels.TRITON_BITS:
                continue
            if not triton_runs:
                why = triton_kernels.unavailable_reason() or f"needs CUDA (device: {device})"
                rows.append({"shape": f"{out_f}x{in_f}", "scheme": name, "path": f"cuda_triton: not run ({why})"})
                continue
            for m in (1, 16):  # decoding and a speculative verification / small batch
                previous = os.environ.get("HF_EFFICIENCY_KERNEL")
                os.environ["HF_EFFICIENCY_KERNEL"] = "cuda_triton"
                try:
                    with torch.no_grad():
                        y = q(xds[m])
                        path = q.last_path
                        t = timed(lambda m=m: q(xds[m]), device)
                finally:
                    if previous is None:
                        del os.environ["HF_EFFICIENCY_KERNEL"]
                    else:
                        os.environ["HF_EFFICIENCY_KERNEL"] = previous
                err = float((y.float().cpu() - refs[m]).abs().max() / refs[m].abs().max())
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "m": m,
                        "scheme": name,
                        "path": f"{path} (forced)",
                        "us": round(t * 1e6, 2),
                        "GB/s": round(out_f * in_f * bits / 8 / t / 1e9, 1),
                        "rel_err": round(err, 5),
                        "vs_bf16": round(base[m] / t, 3),
                    }
                )
        rows += _torchao_int4_rows(linear, xs, xds, base, device, out_f, in_f)
    return rows


def _torchao_int4_rows(linear: nn.Linear, xs: dict, xds: dict, base: dict, device: str, out_f: int, in_f: int):
    """torchao's int4 weight-only linear (group 128, bf16) at M = 1 and 16, or one row saying why not."""
    shape = f"{out_f}x{in_f}"
    try:
        import torchao
        from torchao.quantization import quantize_
    except Exception as exc:  # noqa: BLE001 - not installed or broken: recorded
        return [{"shape": shape, "scheme": "int4-g128", "path": f"torchao: not installed ({type(exc).__name__})"}]
    if device != "cuda":
        return [{"shape": shape, "scheme": "int4-g128", "path": f"torchao {torchao.__version__}: needs CUDA"}]
    import copy

    from torchao.quantization import Int4WeightOnlyConfig

    errors = []
    model = None
    for kwargs in ({"int4_packing_format": "tile_packed_to_4d"}, {}):  # tinygemm packing first, then the default
        try:
            candidate = copy.deepcopy(linear).to(device, torch.bfloat16)
            quantize_(candidate, Int4WeightOnlyConfig(group_size=128, **kwargs))
            candidate(xds[1])
            model, how = candidate, kwargs.get("int4_packing_format", "default")
            break
        except Exception as exc:  # noqa: BLE001 - API differences between torchao versions
            errors.append(f"{kwargs}: {type(exc).__name__}: {exc}"[:200])
    if model is None:
        return [
            {"shape": shape, "scheme": "int4-g128", "path": f"torchao {torchao.__version__}: " + " | ".join(errors)}
        ]
    rows = []
    for m in (1, 16):
        with torch.no_grad():
            y = model(xds[m])
            t = timed(lambda m=m: model(xds[m]), device)
        ref = F.linear(xs[m], linear.weight.detach())
        rows.append(
            {
                "shape": shape,
                "m": m,
                "scheme": "int4-g128",
                "path": f"torchao {torchao.__version__} ({how})",
                "us": round(t * 1e6, 2),
                "GB/s": round(out_f * in_f * 4 / 8 / t / 1e9, 1),
                "rel_err": round(float((y.float().cpu() - ref).abs().max() / ref.abs().max()), 5),
                "vs_bf16": round(base[m] / t, 3),
            }
        )
    return rows


def _random_llama(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def section_decode(device: str, smoke: bool) -> list[dict]:
    from hf_efficiency.speculative.drafts import draft_quantization, quantized_copy

    rows = []
    new = 16 if smoke else 128
    shapes = {"tiny": TINY} if smoke else {"SmolLM2-135M shape": SMOLLM2, "Llama-1.1B shape": LLAMA_1B}
    for label, shape in shapes.items():
        base = _random_llama(shape, device, torch.bfloat16)
        ids = torch.randint(2, shape["vocab_size"], (1, 32), device=device)
        variants = {
            "bf16": base,
            "int8": quantized_copy(base, draft_quantization("int8")),
            "int4-g128": quantized_copy(base, draft_quantization("int4")),
            "int4-g32": quantized_copy(base, draft_quantization("int4-g32")),
        }
        for name, model in variants.items():

            def run(model=model):
                return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

            run()
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t
            paths = sorted(
                {m.last_path for m in model.modules() if isinstance(m, QuantLinear) and hasattr(m, "last_path")}
            )
            rows.append(
                {"model": label, "weights": name, "tokens/s": round(new / secs, 1), "paths": ",".join(paths) or "dense"}
            )
        del variants, base
    return rows


def section_speculative(device: str, smoke: bool) -> list[dict]:
    from hf_efficiency.speculative.drafts import draft_model_for

    rows = []
    new = 16 if smoke else int(os.environ.get("GPU_CHECK_NEW_TOKENS", "96"))
    shape = TINY if smoke else SMOLLM2
    target = _random_llama(shape, device, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(4):
        p = torch.randint(2, shape["vocab_size"], (int(torch.randint(8, 40, (1,), generator=g)),), generator=g)
        prompts.append((p.repeat(2) if i % 2 == 0 else p).to(device))
    one = prompts[0][None]
    batch, mask = left_pad(prompts, 0, device)

    def clock(fn):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    plain1, t_plain1 = clock(lambda: target.generate(one, max_new_tokens=new, do_sample=False))
    plain4, t_plain4 = clock(lambda: target.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False))
    rows.append(
        {"draft": "none (plain greedy)", "batch": 1, "identical": True, "seconds": round(t_plain1, 3), "speedup": 1.0}
    )
    rows.append(
        {"draft": "none (plain greedy)", "batch": 4, "identical": True, "seconds": round(t_plain4, 3), "speedup": 1.0}
    )
    kinds = os.environ.get("GPU_CHECK_DRAFTS", "int8,int4,int4-g32,early-exit:8,ngram").split(",")
    for kind in kinds:
        if smoke and kind.startswith("early-exit"):
            kind = "early-exit:2"
        res1, t1 = clock(
            lambda: target.generate(
                one, max_new_tokens=new, do_sample=False, draft_model=kind, return_dict_in_generate=True
            )
        )
        out1, s1 = res1.sequences, res1.speculative_stats
        res4, t4 = clock(
            lambda: target.generate(
                batch,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=False,
                draft_model=kind,
                return_dict_in_generate=True,
            )
        )
        out4, s4 = res4.sequences, res4.speculative_stats
        row = {
            "draft": kind,
            "batch": 1,
            "identical": bool(torch.equal(out1, plain1)),
            "seconds": round(t1, 3),
            "speedup": round(t_plain1 / t1, 3),
            "acceptance": round(s1.acceptance_rate, 3),
            "passes/token": round(s1.target_passes_per_token, 3),
        }
        if kind.startswith("int"):
            draft = draft_model_for(target, kind)
            _, th = clock(lambda: target.generate(one, max_new_tokens=new, do_sample=False, assistant_model=draft))
            row["hf_assisted_seconds"] = round(th, 3)
        elif kind.startswith("early"):
            layers = int(kind.split(":")[1])
            _, th = clock(
                lambda: target.generate(one, max_new_tokens=new, do_sample=False, assistant_early_exit=layers)
            )
            row["hf_assisted_seconds"] = round(th, 3)
        elif kind == "ngram":
            _, th = clock(lambda: target.generate(one, max_new_tokens=new, do_sample=False, prompt_lookup_num_tokens=4))
            row["hf_assisted_seconds"] = round(th, 3)
        rows.append(row)
        rows.append(
            {
                "draft": kind,
                "batch": 4,
                "identical": bool(torch.equal(out4, plain4)),
                "seconds": round(t4, 3),
                "speedup": round(t_plain4 / t4, 3),
                "acceptance": round(s4.acceptance_rate, 3),
                "passes/token": round(s4.target_passes_per_token, 3),
            }
        )
    return rows


def section_identity(device: str, smoke: bool) -> list[dict]:
    """Batch-4 greedy speculative output against transformers' batched greedy and against each row's
    single-row greedy, in float32 and bfloat16; at a divergence, the target's top-1 minus top-2 logit
    on that row's own prefix (a near tie there means rounding, not bookkeeping, decided the token)."""
    rows = []
    new = 16 if smoke else 64
    shape = TINY if smoke else SMOLLM2
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(4):
        p = torch.randint(2, shape["vocab_size"], (int(torch.randint(8, 40, (1,), generator=g)),), generator=g)
        prompts.append((p.repeat(2) if i % 2 == 0 else p).to(device))
    batch, mask = left_pad(prompts, 0, device)
    width = batch.shape[1]
    for dtype in (torch.float32, torch.bfloat16):
        target = _random_llama(shape, device, dtype)
        plain = target.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, width:]
        singles = [target.generate(p[None], max_new_tokens=new, do_sample=False)[0, p.numel() :] for p in prompts]

        def margin(r: int, upto: int) -> float:
            ids = torch.cat([prompts[r], singles[r][:upto]])[None]
            with torch.no_grad():
                top = target(ids).logits[0, -1].float().topk(2).values
            return round(float(top[0] - top[1]), 4)

        def first_diff(a, b) -> int | None:
            d = (a != b).nonzero()
            return None if d.numel() == 0 else int(d[0])

        for r in range(4):
            d = first_diff(plain[r], singles[r])
            rows.append(
                {
                    "dtype": str(dtype),
                    "draft": "none (transformers batch)",
                    "row": r,
                    "equals_single_row": d is None,
                    "first_diff": d,
                    "margin_at_diff": None if d is None else margin(r, d),
                }
            )
        for kind in ("int8", "ngram", "early-exit:2" if smoke else "early-exit:8"):
            ours = target.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False, draft_model=kind)[
                :, width:
            ]
            for r in range(4):
                d = first_diff(ours[r], singles[r])
                rows.append(
                    {
                        "dtype": str(dtype),
                        "draft": kind,
                        "row": r,
                        "equals_single_row": d is None,
                        "equals_transformers_batch": bool(torch.equal(ours[r], plain[r])),
                        "first_diff": d,
                        "margin_at_diff": None if d is None else margin(r, d),
                    }
                )
    return rows


def section_memory(device: str, smoke: bool) -> list[dict]:
    from transformers import LlamaConfig

    from hf_efficiency import estimate_memory, measure_memory

    cfg = LlamaConfig(**(TINY if smoke else SMOLLM2))
    rows = []
    scenarios = [
        dict(mode="inference", dtype="bfloat16", batch_size=4, sequence_length=512, new_tokens=64),
        dict(
            mode="inference",
            dtype="bfloat16",
            batch_size=4,
            sequence_length=512,
            new_tokens=64,
            efficiency_config={"quantization": {"bits": 4, "group_size": 128}},
        ),
        dict(mode="training", dtype="bfloat16", batch_size=4, sequence_length=512, optimizer="adamw"),
    ]
    for sc in scenarios:
        est = estimate_memory(cfg, device=device, **sc)
        meas = measure_memory(cfg, device=device, **sc)
        total = est.total_without_overhead if device == "cuda" else est.total
        rows.append(
            {
                "scenario": json.dumps(sc),
                "estimated_MiB": round(total / 2**20, 1),
                "measured_MiB": round(meas.peak_bytes / 2**20, 1),
                "error": round((total - meas.peak_bytes) / max(meas.peak_bytes, 1), 4),
            }
        )
    return rows


def section_distill(device: str, smoke: bool) -> list[dict]:
    import tempfile

    from hf_efficiency import DistillationTrainer, DistillationTrainingArguments

    teacher = _random_llama(TINY, device, torch.float32)
    student = _random_llama({**TINY, "num_hidden_layers": 2}, device, torch.float32)
    rows = torch.randint(2, TINY["vocab_size"], (16, 64))
    data = [{"input_ids": r, "labels": r} for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        args = DistillationTrainingArguments(
            output_dir=tmp,
            max_steps=3,
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
            feature_weight=1.0,
            use_cpu=device == "cpu",
            disable_tqdm=True,
            logging_steps=1,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        out = trainer.train()
    return [
        {
            "steps": out.global_step,
            "train_loss": round(out.training_loss, 4),
            "student_device": str(next(trainer.model.parameters()).device),
            "teacher_device": str(next(trainer.teacher.parameters()).device),
        }
    ]


def markdown(results: dict) -> str:
    lines = [
        f"# GPU check ({results['env'].get('device_name', 'cpu')})",
        "",
        "```",
        json.dumps(results["env"], indent=1),
        "```",
        "",
    ]
    for name, rows in results.items():
        if name == "env":
            continue
        lines += [f"## {name}", ""]
        if isinstance(rows, dict) and "error" in rows:
            lines += ["```", rows["error"], "```", ""]
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is")
    parser.add_argument("--sections", default="kernels,decode,speculative,identity,memory,distill")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers

    results: dict = {
        "env": {
            "device": device,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_efficiency": hf_efficiency.__version__,
            "triton": _version("triton"),
            "torchao": _version("torchao"),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        }
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            results[name] = globals()[f"section_{name}"](device, args.smoke)
        except Exception:  # noqa: BLE001 - record and go on with the next section
            results[name] = {"error": traceback.format_exc()[-3000:]}
        results["env"][f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {results['env'][f'{name}_seconds']} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
