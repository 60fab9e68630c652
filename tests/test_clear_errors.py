"""Careless inputs get a message that names the bad thing and what is allowed (issue 22's "unclear" cases)."""

import os
import shutil
import time

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency.attention.kv_cache import QuantizedKVCache
from hf_efficiency.attention.kv_quant import dequantize_kv, quantize_kv
from hf_efficiency.cli import main
from hf_efficiency.data import load_text
from hf_efficiency.integration.checkpoint import CheckpointError

IDS = torch.tensor([[1, 2, 3, 4]])


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "fp"
    make_tiny_llama(seed=5).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def test_a_calibration_file_that_is_not_text_names_the_file(model_dir, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"text file '{binary}' is a binary file: byte 0x80 at offset 128"):
        load_text(str(binary))
    code = main(
        ["quantize", str(model_dir), "--method", "awq", "--calibration-file", str(binary), "--out", str(tmp_path / "q")]
    )
    assert code == 2 and f"text file '{binary}' is a binary file" in capsys.readouterr().err


def test_latin1_text_is_named_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8 text: byte 0xe9 at offset 3"):
        load_text(str(f))


@pytest.mark.parametrize("name", ["int7", "hqq-int9", "early-exit:x", "float8", "gptq-int4"])
def test_a_draft_name_shaped_like_a_kind_is_refused_before_any_hub_lookup(name, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a Hub lookup was attempted")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_hub)
    model = make_tiny_llama()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"draft_model='{name}' is not a draft kind; allowed values: 'int8', 'int4'"):
        model.generate(IDS, draft_model=name, max_new_tokens=2)
    assert time.perf_counter() - start < 5


def test_early_exit_zero_layers_is_refused():
    with pytest.raises(ValueError, match=r"early-exit needs at least 1 decoder layer"):
        make_tiny_llama().generate(IDS, draft_model="early-exit:0", max_new_tokens=2)


def test_a_local_folder_named_like_a_kind_is_still_a_draft(model_dir, tmp_path, monkeypatch):
    shutil.copytree(model_dir, tmp_path / "int7")
    monkeypatch.chdir(tmp_path)
    out = make_tiny_llama(seed=5).generate(IDS, draft_model="int7", max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("command", ["eval", "generate", "quantize"])
def test_a_missing_model_folder_is_named_not_answered_with_the_repo_id_rule(command, tmp_path, capsys):
    args = [command, "/nonexistent/model"] + (["--out", str(tmp_path / "o")] if command == "quantize" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model folder '/nonexistent/model' does not exist" in err and "Repo id must" not in err


def test_a_gguf_folder_without_gguf_file_names_the_file_to_pass(tmp_path, capsys):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "tiny.Q4_0.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(
        CheckpointError,
        match=r"holds GGUF file\(s\) \(tiny\.Q4_0\.gguf\) and no config\.json: pass "
        r"gguf_file='tiny\.Q4_0\.gguf'",
    ):
        AutoModelForCausalLM.from_pretrained(folder)
    assert main(["eval", str(folder)]) == 2
    assert "pass gguf_file='tiny.Q4_0.gguf'" in capsys.readouterr().err
    assert main(["convert", str(folder), "--out", str(tmp_path / "c")]) == 2
    assert "--gguf-file tiny.Q4_0.gguf" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the safetensors index is empty"),
        ("{not json", "not a valid safetensors index"),
        ('{"weight_map": 3}', "a safetensors index is a JSON object with a 'weight_map' object"),
        ('{"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}', "weight_map"),
    ],
)
def test_a_broken_weight_index_is_named(model_dir, tmp_path, content, message):
    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(out, max_shard_size="100KB")
    (out / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: .*{message}"):
        AutoModelForCausalLM.from_pretrained(out)


def test_an_index_naming_a_missing_shard_is_named(model_dir, tmp_path):
    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(out, max_shard_size="100KB")
    shard = sorted(n for n in os.listdir(out) if n.startswith("model-"))[-1]
    (out / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"names shard\(s\) that are not in the folder: {shard}"):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_kv_group_spanning_beyond_float16_reads_back_finite(bits):
    x = torch.tensor([-1e5, 1e5, 0.0, 3.0] * 16).reshape(1, 1, 1, 64)
    codes, scale, minimum = quantize_kv(x, bits, 64)
    assert scale.dtype == minimum.dtype == torch.float32
    y = dequantize_kv(codes, scale, minimum, bits, 64, torch.float32)
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= 2e5 / ((1 << bits) - 1) / 2 * 1.001  # half a step of the group's grid
    assert quantize_kv(torch.randn(1, 1, 2, 64), bits, 64)[1].dtype == torch.float16  # ordinary states: float16


def test_a_quantized_kv_cache_keeps_large_and_ordinary_tokens_together():
    cache = QuantizedKVCache(bits=4, group_size=32)
    small = torch.randn(1, 2, 3, 32)
    big = small * 1e5
    for states in (small, big, small):
        k, v = cache.update(states, states, 0)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert k.shape == (1, 2, 9, 32)
    assert (k[..., 3:6, :] - big).abs().max() <= (big.amax() - big.amin()) / 15  # one step of the widest group
