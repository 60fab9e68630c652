"""The one export API: export_model, save_pretrained(export_format=...), the CLI and the Hub push."""

from __future__ import annotations

import json

import pytest
import torch

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig
from hf_efficiency.export import EXPORT_FORMATS, ExportError, export_model


@pytest.fixture
def quantized(tiny_llama, tmp_path):
    """A tiny Llama quantized with symmetric RTN int4 g32 (exact in every format)."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "float"
    tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1).save_pretrained(src)
    cfg = EfficiencyConfig(quantization={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True})
    return AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg)


def test_formats_listed():
    assert EXPORT_FORMATS == ("compressed-tensors", "gptq", "awq", "gguf")


def test_unknown_format_and_bad_lossy_are_value_errors(quantized, tmp_path):
    with pytest.raises(
        ValueError, match="export_format='onnx' is not allowed; allowed values: compressed-tensors, gptq, awq, gguf"
    ):
        export_model(quantized, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="lossy='yes' is not allowed; allowed values: True, False"):
        export_model(quantized, tmp_path / "x", "gptq", lossy="yes")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_float_model_is_refused(tiny_llama, tmp_path, fmt):
    with pytest.raises(ExportError, match="the model holds no hf-efficiency quantized linear"):
        export_model(tiny_llama(), tmp_path / "x", fmt)


def test_save_pretrained_keywords(quantized, tmp_path):
    with pytest.raises(TypeError, match="lossy= applies with export_format= only"):
        quantized.save_pretrained(tmp_path / "a", lossy=True)
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) safe_serialization"):
        quantized.save_pretrained(tmp_path / "a", export_format="gptq", safe_serialization=True)
    with pytest.raises(TypeError, match="takes its options as keywords"):
        quantized.save_pretrained(tmp_path / "a", True, export_format="gptq")


def test_save_pretrained_exports_and_returns_the_report(quantized, tmp_path):
    report = quantized.save_pretrained(tmp_path / "gptq", export_format="gptq")
    assert report is quantized.export_report
    assert report.format == "gptq" and report.exact and len(report.quantized) == 14
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    # without export_format, our own format as before
    quantized.save_pretrained(tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert ours["quantization_config"]["quant_method"] == "hf_efficiency"


def test_export_report_summary_and_dict(quantized, tmp_path):
    report = export_model(quantized, tmp_path / "ct", "compressed-tensors")
    text = report.summary()
    assert text.startswith(f"compressed-tensors export to {tmp_path / 'ct'}: 14 quantized linear(s)")
    assert "every quantized weight written exactly" in text
    d = report.to_dict()
    assert d["exact"] is True and d["format"] == "compressed-tensors" and set(d["quantized"]) == set(report.quantized)


def test_lossy_export_is_reported_in_the_summary_and_card(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_efficiency.hub.model_card import render_export_card

    src = tmp_path / "float"
    tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1).save_pretrained(src)
    cfg = EfficiencyConfig(quantization={"method": "rtn", "bits": 4, "group_size": 32})  # float minimum
    model = AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg)
    with pytest.raises(ExportError, match="float minima are not whole steps"):
        export_model(model, tmp_path / "refused", "gptq")
    report = export_model(model, tmp_path / "converted", "gptq", lossy=True)
    assert len(report.changes) == 14 and not report.exact
    change = next(iter(report.changes.values()))
    assert 0 < change.max_change < 0.5 and 0 < change.rms_change < 0.5
    assert "14 converted:" in report.summary()
    card = str(render_export_card(model, report, repo_id="me/tiny-gptq"))
    assert "vllm serve me/tiny-gptq --quantization gptq" in card
    assert "text-generation-launcher --model-id me/tiny-gptq --quantize gptq" in card
    assert "### Weights changed by the export" in card and "float minima are not whole steps" in card


def test_gguf_card_gives_llama_cpp_and_ollama_commands(quantized, tmp_path, byte_tokenizer):
    from hf_efficiency.hub.model_card import render_export_card

    report = export_model(quantized, tmp_path / "gguf", "gguf", tokenizer=byte_tokenizer)
    card = str(render_export_card(quantized, report, repo_id="me/tiny-gguf"))
    gguf_file = next(f for f in report.files if f.endswith(".gguf"))
    assert f"llama-cli -m {gguf_file}" in card and "llama-cli -hf me/tiny-gguf" in card
    assert f"FROM ./{gguf_file}" in card and "ollama run hf.co/me/tiny-gguf" in card
    assert "library_name: gguf" in card
    assert "every quantized weight is written exactly" in card


def test_cli_export(quantized, tmp_path, capsys):
    from hf_efficiency.cli import main

    quantized.save_pretrained(tmp_path / "ours")
    main(["export", str(tmp_path / "ours"), "--format", "awq", "--out", str(tmp_path / "awq"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "awq" and result["report"]["exact"] is True
    assert len(result["report"]["quantized"]) == 14
    assert (tmp_path / "awq" / "config.json").is_file()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "ours"), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_cli_errors_name_the_problem(quantized, tiny_llama, tmp_path, capsys):
    from hf_efficiency.cli import main

    quantized.save_pretrained(tmp_path / "ours")
    args = ["export", str(tmp_path / "ours"), "--format", "gptq", "--out", str(tmp_path / "g")]
    assert main([*args, "--embeddings", "f16"]) == 2
    assert "hf-efficiency export: error: --embeddings applies to --format gguf only" in capsys.readouterr().err
    tiny_llama().save_pretrained(tmp_path / "float")
    assert main(["export", str(tmp_path / "float"), "--format", "awq", "--out", str(tmp_path / "a")]) == 2
    assert "the model holds no hf-efficiency quantized linear" in capsys.readouterr().err


def test_exported_weights_are_ours(quantized, tmp_path):
    """The GPTQ export read back by our reader computes the same logits (exact export)."""
    from hf_efficiency.formats import load_compressed

    export_model(quantized, tmp_path / "gptq", "gptq")
    again = load_compressed(tmp_path / "gptq", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, again(ids).logits)
