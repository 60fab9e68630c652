"""A tied output head quantized on an explicit choice: untied, its own quantized copy of the embedding matrix,
saved untied and reloaded to the same logits; the default keeps it float and tied."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_efficiency import QuantLinear
from hf_efficiency.quant.core.scheme import quantize_weight

INT4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}


@pytest.fixture
def tied_dir(tmp_path):
    model = make_tiny_llama(seed=5, tie=True)
    path = tmp_path / "fp"
    model.save_pretrained(path)
    with safe_open(path / "model.safetensors", "pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # a tied checkpoint holds the matrix once
    return path, model


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def test_default_keeps_a_tied_head_float_and_tied(tied_dir):
    path, _ = tied_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    assert type(q.lm_head) is torch.nn.Linear
    assert q.lm_head.weight is q.model.embed_tokens.weight and q.config.tie_word_embeddings


def test_explicit_choice_unties_and_quantizes_the_head(tied_dir, tmp_path, ids):
    path, fp = tied_dir
    cfg = {"quantization": {**INT4, "modules_to_not_convert": []}}
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)
    assert isinstance(q.lm_head, QuantLinear) and (q.lm_head.bits, q.lm_head.group_size) == (4, 32)
    assert q.config.tie_word_embeddings is False and not q.all_tied_weights_keys
    # the input embedding is the float matrix, untouched; the head is its quantization (the reference one)
    assert torch.equal(q.model.embed_tokens.weight, fp.model.embed_tokens.weight)
    expected = quantize_weight(fp.model.embed_tokens.weight, 4, 32, symmetric=False).dequantize()
    assert torch.equal(q.lm_head.dequantize_weight(), expected)
    hidden = q.model(ids).last_hidden_state
    torch.testing.assert_close(q(ids).logits, hidden @ expected.T, rtol=1e-5, atol=1e-5)

    out = tmp_path / "q"
    q.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert {"lm_head.weight", "lm_head.weight_scale", "lm_head.weight_min", "model.embed_tokens.weight"} <= keys
        assert fh.get_slice("lm_head.weight").get_dtype() == "I32"
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.lm_head, QuantLinear) and again.config.tie_word_embeddings is False
    assert torch.equal(again(ids).logits, q(ids).logits)


def test_calibrated_method_quantizes_an_untied_float_copy(tied_dir, byte_tokenizer, tmp_path, ids):
    path, fp = tied_dir
    byte_tokenizer.save_pretrained(path)
    cfg = {
        "quantization": {"method": "gptq", "bits": 4, "group_size": 32, "modules_to_not_convert": []},
        "calibration": {
            "dataset": ["In the beginning God created the heaven and the earth. " * 8],
            "samples": 2,
            "sequence_length": 32,
        },
    }
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)
    assert isinstance(q.lm_head, QuantLinear) and q.config.tie_word_embeddings is False
    assert torch.equal(q.model.embed_tokens.weight, fp.model.embed_tokens.weight)  # GPTQ never touched it
    err = (q.lm_head.dequantize_weight() - fp.model.embed_tokens.weight).abs().max()
    assert 0 < err < fp.model.embed_tokens.weight.abs().max() / 4


_FRESH = r"""
import sys, torch
import hf_efficiency
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save({k: m(v).logits for k, v in ids.items()}, sys.argv[3])
"""


def test_saved_quantized_head_reloads_bit_identical_in_a_fresh_process(tied_dir, tmp_path):
    """The process that quantized (the head untied, int8 under int4 layers) and saved, and a fresh process loading
    the folder: the same logits bit for bit, on a short input (fused kernel rows) and a long one (prefill)."""
    import os
    import subprocess
    import sys

    path, _ = tied_dir
    cfg = {"quantization": {**INT4, "modules_to_not_convert": [], "module_bits": {"lm_head": 8}}}
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg).eval()
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.bits == 8
    out = tmp_path / "q"
    q.save_pretrained(out)
    gen = torch.Generator().manual_seed(4)
    ids = {"short": torch.randint(0, 256, (1, 7), generator=gen), "long": torch.randint(0, 256, (2, 40), generator=gen)}
    with torch.no_grad():
        here = {k: q(v).logits for k, v in ids.items()}
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_EFFICIENCY_KERNEL", "HF_EFFICIENCY_CPU_VECTOR_BITS")}
    r = subprocess.run(
        [sys.executable, "-c", _FRESH, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "fresh.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt")
    for k in ids:
        assert torch.equal(fresh[k], here[k]), k
