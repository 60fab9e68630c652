"""Smoke tests of the scripts in integrations/."""

import importlib.util
import json
import os

from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency import QuantLinear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "integrations", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_and_push_script_saves_evaluated_model_with_card(tmp_path):
    src = tmp_path / "fp"
    make_tiny_llama(seed=7).save_pretrained(src)
    make_byte_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("a quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "q"
    result = _script("quantize_and_push").main(
        [
            "--model",
            str(src),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--text",
            str(text),
            "--num-tokens",
            "256",
            "--window",
            "64",
            "--out",
            str(out),
        ]
    )
    assert result["n_windows"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    card = (out / "README.md").read_text()
    assert f"{result['perplexity']:.3f}"[:4] in card and "hf-efficiency" in card
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quantization"]["group_size"] == 32


def test_speculative_generate_script_streams_and_saves_the_draft_choice(tmp_path, capsys):
    src = tmp_path / "fp"
    make_tiny_llama(seed=7).save_pretrained(src)
    make_byte_tokenizer().save_pretrained(src)
    script = _script("speculative_generate")
    r = script.main(
        ["--model", str(src), "--draft", "int8", "--prompt", "abc abc", "--max-new-tokens", "10", "--stream"]
    )
    assert r["identical_to_plain_greedy"] and r["new_tokens"] == 10 and r["draft"] == "int8"
    assert r["text"] in capsys.readouterr().out  # the streamer printed the same text
    saved = tmp_path / "with-draft"
    r = script.main(
        [
            "--model",
            str(src),
            "--draft",
            "early-exit:1",
            "--num-draft-tokens",
            "2",
            "--max-new-tokens",
            "10",
            "--save-to",
            str(saved),
        ]
    )
    assert r["identical_to_plain_greedy"] and r["target_passes"] >= 1
    spec = json.loads((saved / "config.json").read_text())["quantization_config"]["speculative"]
    assert spec["draft"] == "early-exit:1" and spec["num_draft_tokens"] == 2
