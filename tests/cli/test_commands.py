"""The command table: both CLIs come from `COMMANDS`; method options become flags."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from hf_efficiency.cli import COMMANDS, build_parser, config_from_args, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_table_lists_every_command_and_the_parser_follows_it():
    assert list(COMMANDS) == ["quantize", "convert", "export", "eval", "estimate", "distill", "generate"]
    sub = _subcommands(build_parser())
    assert list(sub) == list(COMMANDS)
    for name, command in COMMANDS.items():
        assert sub[name].description == command.description
        assert any("--json" in a.option_strings for a in sub[name]._actions)


def test_optimum_plugin_is_built_from_the_same_table():
    path = os.path.join(REPO, "optimum", "commands", "register", "hf_efficiency.py")
    spec = importlib.util.spec_from_file_location("hf_efficiency_optimum_register_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (root,) = module.REGISTER_COMMANDS
    infos = root.SUBCOMMANDS
    assert [i.name for i in infos] == list(COMMANDS)
    assert [i.help for i in infos] == [c.help for c in COMMANDS.values()]
    assert [i.subcommand_class.SPEC for i in infos] == list(COMMANDS.values())


def _quantize_args(*flags):
    return build_parser().parse_args(["quantize", "--out", "x", *flags])


def _methods_with(option):
    from hf_efficiency.cli.methods import methods_table

    return [name for name, m in methods_table().items() if option in {f.name for f in dataclasses.fields(m.options)}]


@pytest.mark.skipif(not _methods_with("act_order"), reason="the method table has no gptq options yet")
def test_method_options_become_flags_of_their_method():
    q = config_from_args(_quantize_args("--method", "gptq", "--gptq-damp", "0.05", "--act-order"))["quantization"]
    assert q["method"] == "gptq" and q["gptq"] == {"damp": 0.05, "act_order": True}
    assert "gptq" not in config_from_args(_quantize_args("--method", "gptq"))["quantization"]
    if _methods_with("clip") == ["awq"]:
        q = config_from_args(_quantize_args("--method", "awq", "--no-awq-clip"))["quantization"]
        assert q["awq"] == {"clip": False}
    with pytest.raises(ValueError, match="--gptq-act-order: option\\(s\\) of method 'gptq', but --method is 'rtn'"):
        config_from_args(_quantize_args("--gptq-act-order"))


def test_option_of_another_method_is_a_command_line_error(tmp_path, capsys):
    if not _methods_with("act_order"):
        pytest.skip("the method table has no gptq options yet")
    assert main(["quantize", str(tmp_path), "--method", "hqq", "--act-order", "--out", str(tmp_path / "q")]) == 2
    assert "option(s) of method 'gptq', but --method is 'hqq'" in capsys.readouterr().err


def test_python_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "hf_efficiency.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "estimate" in r.stdout, r.stderr[-2000:]
