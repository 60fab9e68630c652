"""Calibration capture: the data, the decoder-layer inputs, and every statistic the calibrated
algorithms need, from one place.

Capture is sequential (as in GPTQ and llm-compressor): the embeddings run once, then each decoder
layer runs on the inputs produced by the already-quantized layers before it, so only one layer
(plus the activations of the calibration batch) has to sit on the compute device at a time.

Statistics per linear input (:class:`InputStats`), accumulated over calibration tokens:
per-channel ``E[x^2]`` (outlier and mixed-precision sensitivity), ``E|x|`` (AWQ), ``max|x|``
(SmoothQuant), ``X^T X / n`` (GPTQ), and a fixed random subsample of token rows (AWQ's searches
and static activation percentiles). Linears that read the same tensor (q/k/v, gate/up) share
one `InputStats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...config import CalibrationSpec
from ...data import load_text, token_windows
from ...families import find_decoder_layers  # noqa: F401 - re-exported (the layer walk is generic)

logger = logging.get_logger(__name__)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts encoded text with its BOS token (Gemma's does: the model is only ever run
    with it, and without it its activations are unlike any real input's)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a string gets plain windows
        return False
    return bool(ids) and ids[0] == bos


def calibration_windows(spec: CalibrationSpec, tokenizer: Any) -> torch.LongTensor:
    """``[samples, sequence_length]`` token windows of the calibration text. When the tokenizer puts a BOS
    token before encoded text (`adds_bos`), each window is BOS followed by ``sequence_length - 1`` text
    tokens, as the model sees text in use."""
    text = load_text(spec.dataset, split="calibration")
    if not text.strip():
        raise ValueError("calibration data is empty: the calibration text has no characters to tokenize")
    bos = adds_bos(tokenizer) and spec.sequence_length > 2
    length = spec.sequence_length - 1 if bos else spec.sequence_length
    try:
        windows = token_windows(tokenizer, text, window=length, num_tokens=spec.samples * length)
        if bos:
            first = torch.full((windows.shape[0], 1), int(tokenizer.bos_token_id), dtype=windows.dtype)
            windows = torch.cat([first, windows], dim=1)
    except ValueError as e:
        raise ValueError(
            f"calibration data is too short: {e}; give more text or a smaller calibration.sequence_length"
        ) from e
    if windows.shape[0] < spec.samples:
        logger.warning(
            f"calibration text gives only {windows.shape[0]} windows of {spec.sequence_length} tokens "
            f"(calibration.samples={spec.samples}); using {windows.shape[0]}"
        )
    return windows


class _Stop(Exception):
    pass


@dataclass
class LayerBatch:
    """Inputs of one decoder layer for one calibration batch."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@torch.no_grad()
def _forward_batches(model: nn.Module, windows: torch.LongTensor, batch_size: int) -> None:
    """Run the model over the windows in batches (hooks collect what they need); a hook may end a
    batch early by raising `_Stop`."""
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        try:
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
        except _Stop:
            pass


def capture_first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, windows: torch.LongTensor, batch_size: int
) -> list[LayerBatch]:
    """Run the model up to its first decoder layer for every batch and keep that layer's inputs."""
    batches: list[LayerBatch] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        for key in ("cache", "past_key_values", "past_key_value"):
            kw.pop(key, None)
        batches.append(LayerBatch(hidden.detach(), kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward_batches(model, windows, batch_size)
    finally:
        handle.remove()
    return batches


def run_layer(layer: nn.Module, batch: LayerBatch) -> torch.Tensor:
    """The decoder layer's output hidden states for one batch."""
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class InputStats:
    """Running statistics of one linear input ``x [tokens, in]``."""

    in_features: int
    want_xtx: bool = False
    max_rows: int = 4096
    tokens: int = 0
    sq_sum: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    rows_per_batch: int = 512
    xtx_normalized: bool = False

    def add(self, x: torch.Tensor) -> None:
        if self.xtx_normalized:
            raise RuntimeError("InputStats.add after the Hessian was taken")
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sq_sum is None:
            zeros = torch.zeros(self.in_features, device=x.device)
            self.sq_sum, self.abs_sum, self.absmax = zeros.clone(), zeros.clone(), zeros.clone()
            if self.want_xtx:
                self.xtx = torch.zeros(self.in_features, self.in_features, device=x.device)
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        self.abs_sum += x.abs().sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        if sum(r.shape[0] for r in self.rows) < self.max_rows:
            take = torch.randperm(x.shape[0], generator=self.generator)[: self.rows_per_batch].to(x.device)
            self.rows.append(x[take].cpu())

    # --- derived ---------------------------------------------------------------------------
    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq_sum / max(self.tokens, 1)

    @property
    def rms(self) -> torch.Tensor:
        return self.mean_sq.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor | None:
        """``X^T X / n``: the accumulator is divided in place on first use (no second ``[in, in]`` matrix, which
        for an 8192-wide down projection is 256 MiB); no rows may be added afterwards."""
        if self.xtx is None:
            return None
        if not self.xtx_normalized:
            self.xtx.div_(max(self.tokens, 1))
            self.xtx_normalized = True
        return self.xtx

    def sample(self) -> torch.Tensor:
        """The kept token rows ``[<= max_rows, in]`` (CPU, float32)."""
        return torch.cat(self.rows)[: self.max_rows]

    def scale_inputs(self, s: torch.Tensor) -> None:
        """Update every statistic for the input becoming ``x / s`` (after folding scales ``s``
        into the producer of ``x``)."""
        s = s.float()
        inv = 1.0 / s.to(self.sq_sum.device)
        self.sq_sum *= inv * inv
        self.abs_sum *= inv
        self.absmax *= inv
        if self.xtx is not None:
            self.xtx *= inv[:, None] * inv[None, :]
        self.rows = [r / s.cpu() for r in self.rows]


def collect_layer_stats(
    layer: nn.Module,
    batches: list[LayerBatch],
    linear_names: list[str],
    *,
    want_xtx: bool,
    max_rows: int = 4096,
) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Run ``layer`` on every batch with hooks on ``linear_names`` (names inside the layer).

    Returns the statistics per linear (shared objects for linears reading the same tensor) and
    the layer's outputs per batch.
    """
    stats: dict[str, InputStats] = {}
    # id(tensor) -> (tensor, stats); holding the tensor keeps its id from being reused in the batch
    seen: dict[int, tuple[torch.Tensor, InputStats]] = {}
    per_batch = max(1, -(-max_rows // max(len(batches), 1)))

    def make_hook(name: str, in_features: int):
        def hook(module, args):
            x = args[0]
            key = id(x)
            if name not in stats:
                shared = seen.get(key)
                stats[name] = (
                    shared[1] if shared else InputStats(in_features, want_xtx, max_rows, rows_per_batch=per_batch)
                )
            if key not in seen or seen[key][1] is not stats[name]:
                seen[key] = (x, stats[name])
                stats[name].add(x)

        return hook

    handles = [
        layer.get_submodule(n).register_forward_pre_hook(make_hook(n, layer.get_submodule(n).in_features))
        for n in linear_names
    ]
    outputs = []
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                outputs.append(run_layer(layer, batch))
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def collect_model_input_rms(
    model: nn.Module, windows: torch.LongTensor, names: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """Per-channel RMS of the input of every named linear over a plain forward of the float
    model (used to measure sensitivities before anything is quantized)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        _forward_batches(model, windows, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).sqrt() for n in names if n in sums}
