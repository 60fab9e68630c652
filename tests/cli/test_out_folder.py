"""``--out`` of quantize / convert / export: never written into an existing folder unless ``--overwrite``, and
then replaced as a whole."""

import os

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency.cli import main


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "fp"
    make_tiny_llama(seed=5).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def _logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(torch.tensor([[1, 2, 3, 4]])).logits


def test_quantize_refuses_a_non_empty_out_and_leaves_it_untouched(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--bits", "8", "--out", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "--bits", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}' exists and is not empty (README.md, config.json" in err and "pass --overwrite" in err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_overwrite_replaces_the_whole_folder(model_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--bits", "8", "--out", str(out)]) == 0
    (out / "stale-notes.txt").write_text("from the earlier run")
    (out / "model.safetensors").rename(out / "model-00001-of-00002.safetensors")  # a stale shard of a bigger save
    assert (
        main(["quantize", str(model_dir), "--bits", "4", "--out", str(out), "--overwrite", "--max-shard-size", "50KB"])
        == 0
    )
    names = sorted(os.listdir(out))
    assert "stale-notes.txt" not in names and "model.safetensors.index.json" in names
    assert sorted(os.listdir(tmp_path)) == ["fp", "q"]  # no staging or replaced folder left beside it
    fresh = tmp_path / "fresh"
    assert main(["quantize", str(model_dir), "--bits", "4", "--out", str(fresh)]) == 0
    assert torch.equal(_logits(out), _logits(fresh))


def test_an_empty_out_folder_is_accepted(model_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["quantize", str(model_dir), "--bits", "8", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists()


def test_a_failed_quantize_leaves_no_out_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(model_dir),
                "--method",
                "awq",
                "--calibration-file",
                str(tmp_path / "nope.txt"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["fp"]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_convert_and_export_refuse_a_non_empty_out(tmp_path, capsys, command):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = [command, "--out", str(out)] + (["--format", "gguf"] if command == "export" else [])
    assert main(args) == 2
    assert "exists and is not empty (keep.txt)" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_out_that_is_a_file_is_refused(model_dir, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["quantize", str(model_dir), "--bits", "8", "--out", str(f)]) == 2
    assert f"--out '{f}' is a file; give a folder" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_save_pretrained_into_a_file_is_refused(model_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(model_dir, efficiency_config={"quantization": {"bits": 8}})
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match=rf"save_pretrained: '{f}' is a file, not a folder"):
        q.save_pretrained(str(f))
    assert f.read_text() == "x"
