"""``measure_memory``: run an estimator scenario for real and report its peak memory.

The model is built from its config with random weights (values do not change memory), in the
same layout the scenario uses: quantized layers as packed `QuantLinear`s, LoRA through peft,
frozen parameters for the other methods. Then the scenario runs exactly as a user's code
would (``model(ids)``, ``generate``, or forward/backward/``optimizer.step``/``zero_grad`` as
``transformers.Trainer`` does, without holding the outputs across backward).

How peak memory is read:

* **CUDA**: ``torch.cuda.max_memory_allocated()`` minus what was allocated before the model
  was built (the CUDA context is not included; the estimator's ``overhead`` is that part).
* **CPU**: the resident set size. Before the model is built, a one-layer copy of the model
  runs the same scenario (so lazy imports and kernel initialization are not counted), freed
  heap is returned with ``malloc_trim`` and the baseline RSS is read. After setup the kernel's
  peak-RSS counter (``VmHWM``) is reset through ``/proc/self/clear_refs``; the peak is
  ``VmHWM`` minus the baseline, so it covers the weights plus everything the scenario adds.
  Linux only. glibc raises its mmap threshold as blocks are freed (up to 32 MiB), after which
  freed mid-size tensors stay in the heap and in RSS; with ``pin_allocator=True`` (default)
  the threshold is pinned to 128 KiB (``mallopt(M_MMAP_THRESHOLD)``) before the baseline, so
  freed tensors leave RSS and the CPU number counts live memory as CUDA's allocator stats do.
  ``pin_allocator=False`` measures the default allocator's RSS, retention included.

``isolate=True`` runs the measurement in a fresh Python process so earlier work in the caller
cannot distort it.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .scenarios import DTYPES, MemoryScenario, resolve_dtype
from .shapes import load_config
from .training import TrainingSetup, lora_targets


@dataclass
class MemoryMeasurement:
    """Measured peak memory of one scenario, in bytes above the pre-model baseline."""

    device: str
    method: str
    peak_bytes: int
    resident_after_setup: int
    baseline_bytes: int
    seconds: float
    scenario: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- peak readers ---------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


_M_MMAP_THRESHOLD = -3


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 128 KiB (disables its dynamic growth); False if not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


_pin_allocator = pin_mmap_threshold  # the former name (hf_efficiency.quant.calibrated.onload uses it)


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakMemory:
    """Current and peak memory of this process: the allocator on CUDA, ``VmRSS`` / ``VmHWM`` on CPU (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if not self.cuda and not os.path.exists("/proc/self/clear_refs"):
            raise RuntimeError("CPU peak memory is read from /proc (Linux); on this system measure on CUDA")

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM")


def peak_memory_of(fn, device: str | torch.device = "cpu") -> tuple[Any, int, float]:
    """Run ``fn()`` and return ``(its result, peak bytes above the memory in use before it, seconds)``;
    on CPU from the process's resident-set high-water mark (Linux), on CUDA from the allocator."""
    pin_mmap_threshold()
    trim_heap()
    peak = PeakMemory(torch.device(device))
    base = peak.current()
    peak.reset()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, max(peak.peak() - base, 0), seconds


# --- model construction ---------------------------------------------------------------------
def _fill_random(model: nn.Module) -> None:
    """Touch every quantized buffer (``torch.empty`` pages are not resident until written)."""
    from ..quant.modules.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            with torch.no_grad():
                m.weight.random_()
                m.weight_scale.fill_(1e-3)
                if m.weight_min is not None:
                    m.weight_min.fill_(-8e-3)
                if getattr(m, "weight_zero", None) is not None:
                    m.weight_zero.fill_(2 ** (m.bits - 1))
                if m.bias is not None:
                    m.bias.zero_()
                if m.weight_outlier_index is not None:
                    m.weight_outlier_index.zero_()
                    m.weight_outlier_value.zero_()


def build_model(
    config,
    *,
    dtype: torch.dtype,
    efficiency_config=None,
    setup: TrainingSetup | None = None,
    attn_implementation: str = "sdpa",
    device: str = "cpu",
) -> nn.Module:
    """A randomly initialized model in the scenario's layout (quantized, LoRA, frozen)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if efficiency_config is not None and efficiency_config.quantization is not None:
        from .estimator import quantize_structure

        quantize_structure(model, efficiency_config)
        _fill_random(model)
    model.to(device)
    if setup is None:
        model.requires_grad_(False)
        return model
    if setup.uses_lora:
        from peft import LoraConfig, get_peft_model

        from .. import register

        register()  # peft learns QuantLinear (idempotent; needed if peft was half-imported at registration)
        targets = lora_targets(setup, config)  # the default q/k/v/o names: the family's attention projections
        targets = targets if isinstance(targets, str) else list(targets)
        model = get_peft_model(
            model, LoraConfig(r=setup.lora_rank, target_modules=targets, lora_dropout=setup.lora_dropout)
        )
    elif setup.method != "full":
        from ..peft.methods import apply_peft

        spec = {"method": setup.method}
        if setup.method == "bitfit":
            spec["bitfit_add_missing"] = setup.bitfit_add_missing
        elif setup.method == "freeze":
            spec["freeze_layers"] = setup.freeze_layers
        else:
            spec.update(
                adapter_size=setup.adapter_size,
                adapter_placement=setup.adapter_placement,
                adapter_nonlinearity=setup.adapter_nonlinearity,
            )
        model = apply_peft(model, spec)
    return model


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch (or bitsandbytes / transformers) optimizer a scenario's ``optimizer`` names."""
    if name == "adamw":  # transformers.Trainer's default, adamw_torch_fused
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-5)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-5, relative_step=False, scale_parameter=False)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("measuring adamw_8bit needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(params, lr=1e-5)


# --- scenarios ------------------------------------------------------------------------------
def run_steps(
    model: nn.Module,
    mode: str,
    *,
    batch_size: int,
    seq: int,
    new_tokens: int,
    optimizer: str,
    steps: int,
    device: torch.device,
    mixed_precision: str | None,
    gradient_checkpointing: bool,
    peak: PeakMemory | None,
    build_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> None:
    """Run the measured work on ``model`` (a transformers model, or one wrapped by DDP/FSDP as ``.module``):
    one forward or ``generate`` of ``new_tokens`` for inference, ``steps`` optimizer steps for training (the
    optimizer from ``build_optimizer``, default `make_optimizer` of ``optimizer``); ``peak`` is reset just
    before."""
    inner = getattr(model, "module", model)
    vocab = inner.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq), device=device)
    if mode == "inference":
        model.eval()
        if peak is not None:
            trim_heap()
            peak.reset()
        with torch.no_grad():
            if new_tokens:
                model.generate(
                    ids,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    attention_mask=torch.ones_like(ids),
                )
            else:
                model(input_ids=ids, use_cache=True)
        return
    model.train()
    if gradient_checkpointing:
        enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
        enable()
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params) if build_optimizer is not None else make_optimizer(optimizer, params)
    if peak is not None:
        trim_heap()
        peak.reset()
    amp = DTYPES[mixed_precision] if mixed_precision else None
    for _ in range(steps):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)


def one_layer_config(config):
    """A one-layer copy of ``config`` with at most 512 tokens of vocabulary (the warm-up model)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    small.vocab_size = min(small.vocab_size, 512)
    return small


def measure_memory(
    model: Any,
    scenario: MemoryScenario | dict[str, Any] | str | None = None,
    *,
    steps: int = 3,
    isolate: bool = False,
    pin_allocator: bool = True,
    **scenario_fields: Any,
) -> MemoryMeasurement:
    """Build the scenario `estimate_memory` describes with random weights, run it and return
    its measured peak (see the module docstring for how memory is read on CPU and CUDA).

    Takes the same scenario as `estimate_memory`: a `MemoryScenario` (or its dict) and/or its fields
    as keyword arguments. Without a `MemoryScenario`, ``device`` defaults to this machine's
    accelerator (``cuda`` when available, else ``cpu``) instead of the scenario's ``cuda``.
    ``kv_cache_bits`` is refused (the measurement runs transformers' float KV cache only);
    ``overhead_bytes`` does not apply (the measurement starts after the runtime's own memory).
    ``steps`` training steps run so the optimizer states exist during later forwards, as in a
    real run.
    """
    if not isinstance(scenario, MemoryScenario) and scenario_fields.get("device") is None:
        given = scenario.get("device") if isinstance(scenario, dict) else None
        scenario_fields["device"] = given or ("cuda" if torch.cuda.is_available() else "cpu")
    s = MemoryScenario.build(scenario, **scenario_fields)
    if s.kv_cache_bits is not None:
        raise ValueError(
            f"kv_cache_bits={s.kv_cache_bits!r} cannot be measured (measure_memory runs the float KV cache "
            "only); allowed values: None"
        )
    if s.device_type not in ("cuda", "cpu"):
        raise ValueError(f"device={s.device!r} cannot be measured; allowed values: cuda, cpu")
    if s.parallel_plan is not None and not s.parallel_plan.is_single_device:
        raise ValueError(
            f"parallel={s.parallel!r} cannot be measured in one process; allowed values: None or one device "
            "(measure_parallel.measure_memory_parallel runs a plan)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not allowed; allowed values: integers >= 1")
    config = load_config(model)
    eff = s.efficiency
    setup = s.training_setup
    record = dict(
        mode=s.mode,
        dtype=s.dtype,
        batch_size=s.batch_size,
        sequence_length=s.sequence_length,
        new_tokens=s.new_tokens,
        optimizer=s.optimizer,
        gradient_checkpointing=s.gradient_checkpointing,
        attn_implementation=s.attn_implementation,
        mixed_precision=s.mixed_precision,
        device=s.device,
        steps=steps,
        pin_allocator=pin_allocator,
        efficiency_config=s.efficiency_config,
        training=None if setup is None else asdict(setup),
    )
    if isolate:
        return _measure_in_subprocess(config, s, steps=steps, pin_allocator=pin_allocator, record=record)
    weight_dtype = resolve_dtype(s.dtype, config)
    device = s.device
    dev = torch.device(device)
    peak = PeakMemory(dev)
    pinned = dev.type == "cpu" and pin_allocator and pin_mmap_threshold()
    run = dict(
        batch_size=s.batch_size,
        seq=s.sequence_length,
        new_tokens=s.new_tokens,
        optimizer=s.optimizer,
        device=dev,
        mixed_precision=s.mixed_precision,
        gradient_checkpointing=s.gradient_checkpointing,
    )
    build = dict(dtype=weight_dtype, efficiency_config=eff, setup=setup, attn_implementation=s.attn_implementation)
    # warm-up on a one-layer copy: imports, kernels and allocator arenas are not the model's memory
    warm = build_model(one_layer_config(config), device=device, **build)
    run_steps(
        warm,
        s.mode,
        steps=2 if s.mode == "training" else 1,
        peak=None,
        **{**run, "seq": min(s.sequence_length, 16), "new_tokens": min(s.new_tokens, 2)},
    )
    del warm
    trim_heap()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    baseline = peak.current()
    start = time.perf_counter()
    built = build_model(config, device=device, **build)
    trim_heap()
    resident = peak.current() - baseline
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    run_steps(built, s.mode, steps=steps, peak=peak, **run)
    top = peak.peak() - baseline
    seconds = time.perf_counter() - start
    del built
    trim_heap()
    return MemoryMeasurement(
        device=device,
        method="cuda_max_memory_allocated" if dev.type == "cuda" else ("rss_vmhwm_pinned" if pinned else "rss_vmhwm"),
        peak_bytes=top,
        resident_after_setup=resident,
        baseline_bytes=baseline,
        seconds=seconds,
        scenario=record,
        trainable_parameters=trainable,
    )


def _measure_in_subprocess(
    config, scenario: MemoryScenario, *, steps: int, pin_allocator: bool, record: dict[str, Any]
) -> MemoryMeasurement:
    payload = json.dumps(
        {
            "config": config.to_dict(),
            "scenario": scenario.to_dict(),
            "steps": steps,
            "pin_allocator": pin_allocator,
        }
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "from hf_efficiency.memory.measure import _main; _main()"
    proc = subprocess.run([sys.executable, "-c", code], input=payload, text=True, capture_output=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"isolated measurement failed:\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["scenario"] = record
    return MemoryMeasurement(**data)


def _main() -> None:
    from transformers import AutoConfig

    data = json.loads(sys.stdin.read())
    cfg = dict(data["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    scenario = MemoryScenario.from_dict(data["scenario"])
    result = measure_memory(config, scenario, steps=data["steps"], pin_allocator=data["pin_allocator"])
    print(json.dumps(result.to_dict()))


def saved_activation_bytes(model: nn.Module, **inputs: Any) -> int:
    """Exact bytes autograd saves for backward during ``model(**inputs)``: every saved tensor's
    storage counted once, parameters (and views of them) excluded. The estimator's activation
    rules are tested against this."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return total
