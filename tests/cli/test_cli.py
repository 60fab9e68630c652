"""`hf-efficiency` CLI, `optimum-cli hf-efficiency` registration, and the OptimumQuantizer subclass."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency import QuantLinear
from hf_efficiency.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "fp"
    make_tiny_llama(seed=5).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text("In the beginning was the Word, and the Word was with God. " * 40)
    return f


def test_quantize_writes_complete_folder_then_eval_reads_it(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "int4"
    code = main(
        [
            "quantize",
            str(model_dir),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--out",
            str(out),
            "--json",
            "--eval",
            "--text-file",
            str(text_file),
            "--window",
            "64",
            "--num-tokens",
            "512",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    files = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "hf_efficiency_eval.json",
    } <= files
    assert summary["config"]["quantization"]["bits"] == 4 and summary["config"]["quantization"]["group_size"] == 32
    assert summary["bytes"]["bits_per_weight"] == pytest.approx(5.0)
    assert summary["eval"]["n_windows"] == 8 and summary["eval"]["window"] == 64
    assert "perplexity" in (out / "README.md").read_text().lower()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)

    assert (
        main(
            [
                "eval",
                str(out),
                "--text-file",
                str(text_file),
                "--window",
                "64",
                "--num-tokens",
                "512",
                "--no-speed",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(summary["eval"]["perplexity"], rel=1e-6)
    assert result["tokens_per_s"] is None and result["disk_bytes"] > 0
    assert result["quantization_config"]["quant_method"] == "hf_efficiency"


def test_human_output_and_per_channel_symmetric(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "int8"
    assert (
        main(["quantize", str(model_dir), "--bits", "8", "--group-size", "none", "--symmetric", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "bits/weight stored" in text and str(out) in text
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["quantization"]
    assert cfg["group_size"] is None and cfg["symmetric"] is True and cfg["bits"] == 8


def test_bad_arguments_give_clear_errors(model_dir, tmp_path, capsys):
    assert main(["quantize", str(model_dir), "--bits", "5", "--out", str(tmp_path / "x")]) == 2
    assert "quantization.bits=5 is not allowed; allowed values: 8, 4, 3, 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--group-size", "big", "--out", "x"])
    assert "group size must be an integer or 'none', got 'big'" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--text-file", str(tmp_path / "missing.txt"), "--no-speed"]) == 2
    assert "missing.txt" in capsys.readouterr().err


def _load_register_module():
    path = os.path.join(REPO, "optimum", "commands", "register", "hf_efficiency.py")
    spec = importlib.util.spec_from_file_location("hf_efficiency_optimum_register", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimum_cli_registration_runs_our_commands(model_dir, tmp_path):
    from optimum.commands.optimum_cli import RootOptimumCLICommand, register_optimum_cli_subcommand

    register = _load_register_module()
    root = RootOptimumCLICommand("optimum-cli", usage="optimum-cli")
    for command in register.REGISTER_COMMANDS:
        register_optimum_cli_subcommand(command, parent_command=root)
    out = tmp_path / "via-optimum"
    args = root.parser.parse_args(
        ["hf-efficiency", "quantize", str(model_dir), "--bits", "3", "--group-size", "64", "--out", str(out)]
    )
    args.func(args).run()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["quantization"]
    assert cfg["bits"] == 3 and cfg["group_size"] == 64


def _installed_register_file() -> bool:
    try:
        from importlib.metadata import distribution

        files = distribution("hf-efficiency").files or []
    except Exception:
        return False
    return any(str(f).endswith("optimum/commands/register/hf_efficiency.py") for f in files)


@pytest.mark.skipif(
    shutil.which("optimum-cli") is None or not _installed_register_file(),
    reason="needs hf-efficiency installed (pip install .) next to optimum; CI installs it",
)
def test_installed_optimum_cli_lists_hf_efficiency():
    r = subprocess.run(["optimum-cli", "hf-efficiency", "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--group-size" in r.stdout, r.stderr[-2000:]


def test_optimum_quantizer_subclass(model_dir, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    from hf_efficiency.integration.optimum import EfficiencyOptimumQuantizer

    q = EfficiencyOptimumQuantizer.from_pretrained(
        model_dir, efficiency_config={"quantization": {"bits": 4, "group_size": 64}}
    )
    assert isinstance(q, OptimumQuantizer)
    out = q.quantize(tmp_path / "oq")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[1].self_attn.o_proj.group_size == 64
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="no efficiency_config"):
        EfficiencyOptimumQuantizer.from_pretrained(model_dir).quantize(tmp_path / "none")
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\): colour"):
        q.quantize(tmp_path / "bad", colour="red")


def test_quantize_calibrated_method_with_outliers_and_module_bits(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "gptq"
    code = main(
        [
            "quantize",
            str(model_dir),
            "--method",
            "gptq",
            "--bits",
            "3",
            "--group-size",
            "32",
            "--out",
            str(out),
            "--outliers",
            "0.02",
            "--module-bits",
            "down_proj=8",
            "--calibration-file",
            str(text_file),
            "--calibration-samples",
            "4",
            "--calibration-length",
            "128",
            "--act-order",
            "--json",
        ]
    )
    assert code == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["quantization"]["method"] == "gptq" and cfg["quantization"]["outliers"] == 0.02
    assert cfg["quantization"]["module_bits"] == {"down_proj": 8}
    assert cfg["quantization"].get("gptq", {}).get("act_order") is True
    assert cfg["calibration"] == {
        "dataset": str(text_file),
        "samples": 4,
        "sequence_length": 128,
        "batch_size": 4,
        "tokenizer": None,
        "device": None,
    }
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.down_proj.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 3
    assert model.model.layers[0].mlp.up_proj.outliers == 2  # ceil(0.02 * 64)
    card = (out / "README.md").read_text()
    assert "Hessian-based rounding with error compensation (`gptq`, activation order), calibrated on 4 x 128" in card
    assert "2.0% of the weights of every row kept exactly in float16" in card


def test_quantize_w8a8_arguments_and_errors(model_dir, tmp_path, capsys):
    from hf_efficiency.cli import config_from_args

    args = build_parser().parse_args(
        [
            "quantize",
            "--bits",
            "8",
            "--group-size",
            "none",
            "--activations",
            "static",
            "--smoothquant",
            "0.5",
            "--out",
            "x",
        ]
    )
    assert config_from_args(args)["activations"] == {"mode": "static", "smoothquant": 0.5}
    assert config_from_args(args)["quantization"]["symmetric"] is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--method", "magic", "--out", "x"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    code = main(["quantize", str(model_dir), "--module-bits", "down_proj", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--module-bits 'down_proj': expected PATTERN=BITS" in capsys.readouterr().err
    code = main(["quantize", str(model_dir), "--bits", "4", "--activations", "dynamic", "--out", str(tmp_path / "bad")])
    assert code == 2 and "activations (W8A8) needs quantization=" in capsys.readouterr().err


def test_generate_reports_speculative_stats_and_compares_with_plain(model_dir, capsys):
    argv = [
        "generate",
        str(model_dir),
        "--draft",
        "early-exit:1",
        "--prompt",
        "In the beginning",
        "--prompt",
        "And God said",
        "--max-new-tokens",
        "12",
        "--num-draft-tokens",
        "3",
        "--schedule",
        "constant",
        "--compare",
        "--json",
    ]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["identical_to_plain"] is True and len(r["outputs"]) == 2
    s = r["stats"]
    assert s["rows"] == 2 and s["new_tokens"] == 24 and s["mean_draft_length"] <= 3
    assert 0 < s["target_passes_per_token"] <= 1 and r["speedup"] > 0
    assert main(["generate", str(model_dir), "--draft", "ngram", "--prompt", "abcabcabc", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "draft ngram: acceptance" in out and "target passes per token" in out


def test_generate_bad_arguments(model_dir, capsys):
    assert main(["generate", str(model_dir), "--draft", "early-exit:x"]) == 2
    assert "speculative.draft='early-exit:x' is not allowed" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--draft", "early-exit:9"]) == 2
    assert "early-exit:9 needs 1 <= K < 2" in capsys.readouterr().err


def test_quantize_onload_sequential_writes_the_in_memory_folder(model_dir, text_file, tmp_path, capsys):
    """``--onload sequential`` (one decoder layer at a time) writes the same weights and config as the in-memory
    pipeline, plus the same tokenizer, generation config and model card; a refused combination says why."""
    from safetensors.torch import load_file

    args = ["--method", "awq", "--bits", "4", "--group-size", "32", "--calibration-file", str(text_file)]
    args += ["--calibration-samples", "4", "--calibration-length", "64", "--json"]
    outs = {}
    for mode in ("sequential", "in-memory"):
        outs[mode] = tmp_path / mode
        assert main(["quantize", str(model_dir), "--onload", mode, "--out", str(outs[mode]), *args]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["onload"] == mode

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(outs["sequential"]), tensors(outs["in-memory"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        if (outs["in-memory"] / name).exists():
            assert json.loads((outs["sequential"] / name).read_text()) == json.loads(
                (outs["in-memory"] / name).read_text()
            ), name
    card = (outs["sequential"] / "README.md").read_text()
    assert card == (outs["in-memory"] / "README.md").read_text()

    code = main(
        ["quantize", str(model_dir), "--onload", "sequential", "--rotation", "hadamard", "--out", str(tmp_path / "r")]
    )
    assert code != 0
    assert "rotates every weight of the model before the first layer" in capsys.readouterr().err
