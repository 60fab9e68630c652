"""Greedy generation with vLLM (CPU build), run inside the vLLM venv by ``benchmarks/engine_checks.py``.

    python vllm_generate.py JOB.json OUT.json

JOB: ``{"model": folder, "dtype": "bfloat16", "prompts": [[token ids], ...], "max_new_tokens": 32,
"logprobs": 5, "windows": [[token ids], ...]}``. OUT: ``{"tokens": [[ids], ...], "logprobs": [[{id: logprob}, ...],
...], "seconds": s, "nll": total negative log-likelihood of the windows, "predicted": count}`` (``windows``
optional: every token after the first of each window scored from the window's own prefix).
Prompts go in as token ids, so tokenization cannot differ from ours.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(job_path) as fh:
        job = json.load(fh)
    start = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "bfloat16"), enforce_eager=True, max_model_len=1024, seed=0)
    loaded = time.perf_counter() - start
    params = SamplingParams(
        temperature=0.0, max_tokens=job["max_new_tokens"], logprobs=job.get("logprobs", 5), ignore_eos=True
    )
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params)
    seconds = time.perf_counter() - start
    tokens, logprobs = [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        logprobs.append([{str(k): v.logprob for k, v in step.items()} for step in (completion.logprobs or [])])
    nll, predicted = 0.0, 0
    if job.get("windows"):
        scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in job["windows"]], scoring)
        for window, out in zip(job["windows"], scored):
            for token, step in zip(window[1:], out.prompt_logprobs[1:]):
                nll -= step[token].logprob
                predicted += 1
    with open(out_path, "w") as fh:
        out = {"tokens": tokens, "logprobs": logprobs, "seconds": seconds, "load_seconds": loaded}
        json.dump({**out, "nll": nll, "predicted": predicted}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])  # vLLM's teardown may still abort after this: the caller reads the results
