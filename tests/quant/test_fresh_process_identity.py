"""Saved = loaded on short inputs (issue 22): the process that quantized and saved a model and a fresh process
loading the folder compute bit-identical logits for 1, 7 and 16 rows (the fused CPU kernel's inputs), on the
AVX-512 and the AVX2 rows; and the fused kernel gives the same bits for the same tensors and input whatever
happened earlier in the process (buffer alignment, thread count, layout caches, the ISA row of an earlier call).

Two causes. Outside the kernel: safetensors checkpoints are memory-mapped, so a loaded tensor starts where its
bytes lie in the file, and torch's CPU BLAS rounds a one-row float matmul differently on a weight at 8 mod 16
bytes than on an aligned one; the tied ``lm_head`` of the quantizing process came from the float checkpoint, the
fresh process's from ours (another header length): other bits for every one-row head call (decoding, and
``generate``'s prefill). Loading now moves float tensors to aligned memory (`realign_float_tensors`). The float
checkpoint here is written so that the two files place the embedding 8 bytes apart mod 16. In the kernel's
Python side: a module's cached layout kept the ISA row of the call that built it, so rows forced later in the
process (``HF_EFFICIENCY_CPU_VECTOR_BITS``) silently ran the earlier row; the row is now read per call."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig
from hf_efficiency.quant.kernels import cpu as cpu_kernel
from hf_efficiency.quant.modules.linear import QuantLinear

VECTOR_BITS = [256] + ([512] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
ROWS = (1, 7, 16)  # up to FUSED_MAX_ROWS: every decode step and short prompts take the fused kernel
IDS = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
CONFIG = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}}
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernel.extension() is not None, cpu_kernel.unavailable_reason()  # CI machines are x86-64 + AVX2


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _logits(model) -> dict[str, torch.Tensor]:
    """Full logits and last-token logits (``generate``'s prefill, one row into the head) per row count and ISA row."""
    out = {}
    with torch.no_grad(), _env("HF_EFFICIENCY_KERNEL", None):
        for bits in VECTOR_BITS:
            with _env("HF_EFFICIENCY_CPU_VECTOR_BITS", str(bits)):
                for n in ROWS:
                    out[f"{bits}/{n}"] = model(IDS[:, :n]).logits
                    out[f"{bits}/{n}/last"] = model(IDS[:, :n], logits_to_keep=1).logits
    return out


def _misaligned(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.data_ptr() % cpu_kernel.ALIGNMENT]


def _file_offset(path: Path, key: str) -> int:
    """Byte offset of ``key``'s data in a safetensors file (where a memory-mapped load puts it)."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    return 8 + n + header[key]["data_offsets"][0]


def _write_float_checkpoint(model, folder: Path, offset_mod16: int) -> None:
    """``model.save_pretrained(folder)`` with header padding that puts the embedding at ``offset_mod16`` mod 16."""
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for pad in range(16):
        save_file(tensors, path, metadata={"format": "pt", "pad": "x" * pad})
        if _file_offset(path, EMBED) % 16 == offset_mod16:
            return
    raise AssertionError("no header padding gives that offset")


_FRESH = r"""
import sys, torch
from test_fresh_process_identity import _logits, _misaligned
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
path = model.model.layers[0].mlp.down_proj
out = _logits(model)
torch.save({"logits": out, "misaligned": _misaligned(model), "path": path.last_path}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The quantizing process's logits and a fresh process's, loading the saved folder."""
    root = tmp_path_factory.mktemp("fresh")
    float_dir, q_dir = root / "float", root / "q"
    model = make_tiny_llama(vocab_size=49152, hidden_size=128, intermediate_size=256, tie=True)
    _write_float_checkpoint(model, float_dir, 0)
    AutoModelForCausalLM.from_pretrained(float_dir, efficiency_config=EfficiencyConfig(**CONFIG)).save_pretrained(q_dir)
    # the float embedding 8 bytes off the quantized checkpoint's, mod 16 (what made the logits differ)
    target = (_file_offset(q_dir / "model.safetensors", EMBED) + 8) % 16
    _write_float_checkpoint(model, float_dir, target)
    quantized = AutoModelForCausalLM.from_pretrained(float_dir, efficiency_config=EfficiencyConfig(**CONFIG)).eval()
    quantized.save_pretrained(q_dir)
    offsets = [_file_offset(folder / "model.safetensors", EMBED) for folder in (float_dir, q_dir)]
    assert (offsets[1] - offsets[0]) % 16 == 8, offsets
    here = _logits(quantized)
    assert quantized.model.layers[0].mlp.down_proj.last_path == "cpu_fused"
    out = root / "fresh.pt"
    paths = [str(Path(__file__).parent), str(Path(__file__).parent.parent), *sys.path]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_EFFICIENCY_KERNEL", "HF_EFFICIENCY_CPU_VECTOR_BITS")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    r = subprocess.run(
        [sys.executable, "-c", _FRESH, str(q_dir), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = torch.load(out)
    assert fresh["path"] == "cpu_fused"
    return {"here": here, "fresh": fresh, "misaligned": _misaligned(quantized)}


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bits", VECTOR_BITS)
def test_fresh_process_loads_the_saved_model_bit_for_bit(runs, bits, rows):
    for key in (f"{bits}/{rows}", f"{bits}/{rows}/last"):
        here, fresh = runs["here"][key], runs["fresh"]["logits"][key]
        assert torch.equal(here, fresh), (
            f"{key}: max |diff| {(here - fresh).abs().max().item():.3g}; float tensors off {cpu_kernel.ALIGNMENT}-byte "
            f"alignment: {len(runs['misaligned'])} in the quantizing process, {len(runs['fresh']['misaligned'])} in "
            f"the fresh one (first: {(runs['misaligned'] + runs['fresh']['misaligned'])[:1]})"
        )


def test_loaded_float_tensors_are_aligned(runs):
    """Both loads (quantizing and pre-quantized) leave no float tensor where the memory map put it."""
    assert runs["misaligned"] == []
    assert runs["fresh"]["misaligned"] == []


# --- the kernel alone: same tensors, same input, same bits -------------------------------------------------------
def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` starting ``offset`` bytes past an aligned allocation."""
    nbytes = t.numel() * t.element_size()
    buf = torch.empty(nbytes + 128, dtype=torch.uint8)
    out = buf[offset : offset + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _modules() -> dict[str, QuantLinear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    return {
        "int4 g32 float min": QuantLinear.from_linear(linear, bits=4, group_size=32, symmetric=False),
        "int4 g64 symmetric": QuantLinear.from_linear(linear, bits=4, group_size=64, symmetric=True),
        "int4 g32 integer zero": QuantLinear.from_linear(
            linear, bits=4, group_size=32, symmetric=False, zero_point="integer"
        ),
        "int3 g32 (repacked)": QuantLinear.from_linear(linear, bits=3, group_size=32, symmetric=False),
        "int8 per channel": QuantLinear.from_linear(linear, bits=8, group_size=None, symmetric=True),
    }


@pytest.mark.parametrize("bits", VECTOR_BITS)
def test_fused_kernel_bits_do_not_depend_on_process_history(bits, monkeypatch):
    monkeypatch.delenv("HF_EFFICIENCY_KERNEL", raising=False)
    threads = torch.get_num_threads()
    other = {256: "512", 512: "256"}[bits] if len(VECTOR_BITS) > 1 else str(bits)
    for name, module in _modules().items():
        for rows in ROWS:
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
            monkeypatch.setenv("HF_EFFICIENCY_CPU_VECTOR_BITS", str(bits))
            fresh = copy.deepcopy(module)  # no cached layout
            with torch.no_grad():
                ref = fresh(x)
            assert fresh.last_path == "cpu_fused"
            variants = {}
            with torch.no_grad():
                for offset in (4, 8, 12, 16, 32):  # input buffer alignment
                    variants[f"x at +{offset} bytes"] = lambda o=offset: module(_at_offset(x, o))
                variants["two threads"] = lambda: (torch.set_num_threads(2), module(x))[1]
                variants["one thread"] = lambda: (torch.set_num_threads(1), module(x))[1]
                moved = copy.deepcopy(module)  # the module's own tensors off alignment, as a memory map leaves them
                for t in ("weight", "weight_scale", "weight_min", "weight_zero"):
                    if (value := getattr(moved, t)) is not None:
                        setattr(moved, t, torch.nn.Parameter(_at_offset(value.data, 8), requires_grad=False))
                variants["tensors at +8 bytes"] = lambda: moved(x)
                stale = copy.deepcopy(module)  # layout cached by a call on the other ISA row
                monkeypatch.setenv("HF_EFFICIENCY_CPU_VECTOR_BITS", other)
                stale(x)
                stale(torch.randn(40, 256))  # and a prefill (de-quantization + GEMM)
                monkeypatch.setenv("HF_EFFICIENCY_CPU_VECTOR_BITS", str(bits))
                variants["after calls on the other ISA row"] = lambda: stale(x)
                try:
                    for label, run in variants.items():
                        y = run()
                        torch.set_num_threads(threads)
                        assert torch.equal(y, ref), f"{name}, {rows} rows, {label}: {(y - ref).abs().max().item():.3g}"
                finally:
                    torch.set_num_threads(threads)


def test_realign_float_tensors_keeps_ties_and_leaves_packed_codes():
    storage = torch.randn(64 * 32 + 8)
    shared = torch.nn.Parameter(storage[2 : 2 + 64 * 32].view(64, 32))  # 8 bytes off, as a memory map leaves it
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(64, 32), "head": torch.nn.Linear(32, 64, bias=False)})
    model.embed.weight = model.head.weight = shared
    codes = torch.empty(4 * 16 + 1, dtype=torch.int32)[1:].view(4, 16)
    model.head.register_buffer("codes", codes)
    values = shared.detach().clone()
    assert cpu_kernel.realign_float_tensors(model) == 1  # the tied weight once; the int32 codes stay put
    assert model.embed.weight is model.head.weight is shared and torch.equal(shared, values)
    assert shared.data_ptr() % cpu_kernel.ALIGNMENT == 0
    assert model.head.codes.data_ptr() == codes.data_ptr()
    assert cpu_kernel.realign_float_tensors(model) == 0
