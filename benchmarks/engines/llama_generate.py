"""Greedy generation with llama.cpp (llama-cpp-python), run inside its venv by ``benchmarks/engine_checks.py``.

    python llama_generate.py JOB.json OUT.json

JOB: ``{"model": file.gguf, "prompts": [[token ids], ...], "max_new_tokens": 32, "threads": 2,
"windows": [[token ids], ...], "kv_type": 0}`` (the KV cache's ggml type: 0 float32, 1 float16). OUT: ``{"tokens": [[ids], ...], "top": [[[[id, logit], ...] per step] per
prompt], "seconds": s, "n_vocab": ..., "nll": total negative log-likelihood, "predicted": count}``. Prompts go in
as token ids (no tokenization by llama.cpp), and each step's top logits are recorded so a differing token can
be shown to be a near-tie; ``windows`` (optional) are scored for perplexity: every token after the first of
each window, predicted from the window's own prefix.
"""

import json
import sys
import time


def main(job_path: str, out_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    with open(job_path) as fh:
        job = json.load(fh)
    llm = Llama(
        model_path=job["model"],
        n_ctx=512,
        n_batch=512,
        n_threads=job.get("threads", 2),
        logits_all=True,
        verbose=False,
        seed=0,
        type_k=job.get("kv_type", 1),
        type_v=job.get("kv_type", 1),
    )
    tokens, top = [], []
    start = time.perf_counter()
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        out, steps = [], []
        for _ in range(job["max_new_tokens"]):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            best = np.argsort(-logits)[:5]
            steps.append([[int(i), float(logits[i])] for i in best])
            nxt = int(best[0])
            out.append(nxt)
            llm.eval([nxt])
        tokens.append(out)
        top.append(steps)
    seconds = time.perf_counter() - start
    nll, predicted = 0.0, 0
    for window in job.get("windows", []):
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        predicted += len(window) - 1
    with open(out_path, "w") as fh:
        out = {"tokens": tokens, "top": top, "seconds": seconds, "n_vocab": llm.n_vocab()}
        json.dump({**out, "nll": nll, "predicted": predicted}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
