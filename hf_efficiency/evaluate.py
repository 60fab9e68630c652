"""The one evaluation harness: perplexity, weight memory, disk size, decode speed, a sample.

Protocol (used by the CLI, the tests and the benchmarks alike): the text source is resolved
with :func:`hf_efficiency.data.load_text` (split ``"evaluation"``), tokenized once without
special tokens, cut to its first ``num_tokens`` tokens and split into non-overlapping
``window``-token windows. Each window is scored independently (``window - 1`` predicted
tokens); perplexity is ``exp`` of the mean NLL over all predicted tokens.

``bos=True`` (:func:`eval_windows`) starts every window with the tokenizer's BOS token followed by
``window - 1`` text tokens, for models that are only ever run with a BOS token (Gemma: Gemma-3-270M
scores about 20 on the KJV slice without it and about 5.8 with it). The default is off, so numbers
measured before stay comparable.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import describe_text_source, load_text, token_windows

DEFAULT_PROMPT = "The capital of France is"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` over ``windows`` ``[n, window]``, each window scored alone."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_windows, window>=2], got {tuple(windows.shape)}")
    device, was_training = _device(model), model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, windows.shape[0], batch_size), disable=not progress, desc="perplexity", unit="batch"
            ):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                targets = batch[:, 1:]
                nll = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += float(nll)
                total_tokens += targets.numel()
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "windows": int(windows.shape[0]),
        "window": int(windows.shape[1]),
    }


def eval_windows(
    tokenizer: Any, text: str, window: int = 512, num_tokens: int | None = 16384, bos: bool = False
) -> torch.LongTensor:
    """The protocol's ``[n_windows, window]`` windows of ``text`` (`hf_efficiency.data.token_windows`).

    ``bos=True``: each window is ``tokenizer.bos_token_id`` followed by ``window - 1`` text tokens (the same
    number of windows, ``num_tokens // window``; ``ValueError`` if the tokenizer has no BOS token).
    """
    if not bos:
        return token_windows(tokenizer, text, window, num_tokens)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise ValueError("bos=True needs a tokenizer with a bos_token_id; this one has none")
    if window < 3:
        raise ValueError(f"window must be >= 3 with bos=True, got {window}")
    n_windows = None if num_tokens is None else max(1, num_tokens // window)
    body = token_windows(tokenizer, text, window - 1, None if n_windows is None else n_windows * (window - 1))
    return torch.cat([torch.full((body.shape[0], 1), int(bos_id), dtype=body.dtype), body], dim=1)


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and persistent buffers registered directly on ``module``."""
    tensors = [p for p in module._parameters.values() if p is not None]
    skip = module._non_persistent_buffers_set
    tensors += [b for n, b in module._buffers.items() if b is not None and n not in skip]
    return tensors


def weight_bytes(model: nn.Module) -> dict[str, Any]:
    """In-memory bytes of parameters + persistent buffers, shared storage counted once.

    ``quantized``: tensors of modules with a truthy ``hf_efficiency_quantized`` attribute
    (counted first, so they win ties); ``float_linear``: other ``nn.Linear`` modules;
    ``other``: everything else (embeddings, norms, ...). ``bits_per_weight`` is
    ``8 * quantized / quantized_params`` with ``quantized_params`` the sum of
    ``in_features * out_features`` over quantized modules (``None`` if there are none).
    """
    modules = [m for _, m in model.named_modules()]
    quant = [m for m in modules if getattr(m, "hf_efficiency_quantized", False)]
    quant_ids = {id(m) for m in quant}
    out = {"quantized": 0, "float_linear": 0, "other": 0}
    seen: set[tuple[str, int]] = set()
    for m in quant + [m for m in modules if id(m) not in quant_ids]:
        kind = "quantized" if id(m) in quant_ids else "float_linear" if isinstance(m, nn.Linear) else "other"
        for t in _own_tensors(m):
            key = (str(t.device), t.data_ptr() or id(t))
            if key in seen:
                continue
            seen.add(key)
            out[kind] += t.numel() * t.element_size()
    qparams = sum(int(m.in_features) * int(m.out_features) for m in quant)
    return {
        **out,
        "total": sum(out.values()),
        "quantized_modules": len(quant),
        "quantized_params": qparams,
        "bits_per_weight": 8 * out["quantized"] / qparams if qparams else None,
    }


def disk_bytes(folder: str | os.PathLike) -> int:
    """Total size of the ``*.safetensors`` files directly in ``folder``."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"Not a folder: {path}")
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())


def _generate(model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int, exact: bool) -> tuple[torch.Tensor, int]:
    from transformers import GenerationConfig

    inputs = tokenizer(prompt, return_tensors="pt").to(_device(model))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else 0,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=cfg)
    return out, inputs["input_ids"].shape[1]


def decode_speed(
    model: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT, new_tokens: int = 32, runs: int = 3, warmup: int = 1
) -> dict[str, Any]:
    """Greedy decode exactly ``new_tokens`` tokens ``runs`` times; median tokens/s.

    Timings (``time.perf_counter``) include the prompt's prefill.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        _generate(model, tokenizer, prompt, new_tokens, exact=True)
    rates, seconds = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out, n_in = _generate(model, tokenizer, prompt, new_tokens, exact=True)
        elapsed = time.perf_counter() - start
        if out.shape[1] - n_in != new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - n_in} tokens, expected {new_tokens}")
        seconds.append(elapsed)
        rates.append(new_tokens / elapsed)
    return {"tokens_per_s": statistics.median(rates), "runs": rates, "seconds": seconds, "new_tokens": new_tokens}


def generation_sample(model: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (new text only, special tokens skipped)."""
    out, n_in = _generate(model, tokenizer, prompt, max_new_tokens, exact=False)
    return tokenizer.decode(out[0, n_in:], skip_special_tokens=True)


@dataclass
class EvalResult:
    """Everything :func:`evaluate` measured, plus the protocol that produced it."""

    text_source: str
    window: int
    num_tokens: int | None
    n_windows: int
    tokens: int
    perplexity: float
    nll: float
    bytes: dict[str, Any]
    disk_bytes: int | None = None
    tokens_per_s: float | None = None
    decode: dict[str, Any] | None = None
    sample_prompt: str | None = None
    sample: str | None = None
    model: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict."""
        return asdict(self)

    def to_markdown(self, label: str | None = None, header: bool = True) -> str:
        """A one-row markdown table (``header=False``: only the row, for stacking)."""
        mb = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
        bpw = self.bytes.get("bits_per_weight")
        cells = [
            label or self.model or "model",
            f"{self.perplexity:.3f}",
            mb(self.bytes["total"]),
            "-" if bpw is None else f"{bpw:.2f}",
            mb(self.disk_bytes),
            "-" if self.tokens_per_s is None else f"{self.tokens_per_s:.2f}",
        ]
        row = "| " + " | ".join(cells) + " |"
        if not header:
            return row
        return (
            "| model | perplexity | weights MiB | bits/weight (quantized) | disk MiB | "
            "decode tok/s |\n|---|---|---|---|---|---|\n" + row
        )


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    text: Any = "kjv",
    window: int = 512,
    num_tokens: int | None = 16384,
    batch_size: int = 4,
    speed: bool = True,
    sample: bool = True,
    model_dir: str | os.PathLike | None = None,
    progress: bool = True,
    prompt: str = DEFAULT_PROMPT,
    bos: bool = False,
) -> EvalResult:
    """Run the full protocol (see module docstring) and return an :class:`EvalResult`; ``bos``: see
    :func:`eval_windows`."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    windows = eval_windows(tokenizer, load_text(text, split="evaluation"), window, num_tokens, bos=bos)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
    seconds["perplexity"] = time.perf_counter() - start
    decode = None
    if speed:
        start = time.perf_counter()
        decode = decode_speed(model, tokenizer, prompt=prompt)
        seconds["decode"] = time.perf_counter() - start
    name = getattr(model, "name_or_path", None) or (os.fspath(model_dir) if model_dir else None)
    return EvalResult(
        text_source=describe_text_source(text, "evaluation"),
        window=window,
        num_tokens=num_tokens,
        n_windows=ppl["windows"],
        tokens=ppl["tokens"],
        perplexity=ppl["perplexity"],
        nll=ppl["nll"],
        bytes=weight_bytes(model),
        disk_bytes=disk_bytes(model_dir) if model_dir is not None else None,
        tokens_per_s=decode["tokens_per_s"] if decode else None,
        decode=decode,
        sample_prompt=prompt if sample else None,
        sample=generation_sample(model, tokenizer, prompt) if sample else None,
        model=str(name) if name else None,
        seconds=seconds,
    )


__all__ = [
    "EvalResult",
    "decode_speed",
    "disk_bytes",
    "eval_windows",
    "evaluate",
    "generation_sample",
    "perplexity",
    "weight_bytes",
]
