"""Nothing loads wrong, nothing is lost: non-finite values, saves that cannot mix."""

import json
import os

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig
from hf_efficiency.integration.checkpoint import CheckpointError
from hf_efficiency.quant.methods import NonFiniteError
from hf_efficiency.saving import SAVE_ID_KEY

INT4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7]])


@pytest.fixture
def fp_dir(tmp_path):
    path = tmp_path / "fp"
    make_tiny_llama(seed=3, tie=False).save_pretrained(path)
    return path


def _quantized(fp_dir, spec=INT4):
    return AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={"quantization": spec})


def _rewrite(path, mutate):
    with safe_open(path, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    mutate(tensors)
    save_file(tensors, path, metadata=meta)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# --- non-finite and out-of-range values in a checkpoint ---------------------------------------------------


@pytest.mark.parametrize(
    "tensor, value",
    [("weight_scale", float("nan")), ("weight_scale", float("inf")), ("weight_min", float("-inf"))],
)
def test_non_finite_scale_or_minimum_in_a_checkpoint_is_an_error_naming_tensor_and_file(
    fp_dir, tmp_path, tensor, value
):
    out = tmp_path / "q"
    _quantized(fp_dir).save_pretrained(out)
    key = f"model.layers.1.self_attn.v_proj.{tensor}"

    def mutate(t):
        t[key][3, 1] = value

    _rewrite(out / "model.safetensors", mutate)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' in model\.safetensors: values must be finite"):
        AutoModelForCausalLM.from_pretrained(out)


def test_non_finite_outlier_value_in_a_checkpoint_is_an_error(fp_dir, tmp_path):
    out = tmp_path / "q"
    _quantized(fp_dir, {**INT4, "outliers": 0.02}).save_pretrained(out)
    key = "model.layers.0.mlp.down_proj.weight_outlier_value"

    def mutate(t):
        t[key][0, 0] = float("nan")

    _rewrite(out / "model.safetensors", mutate)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' in model\.safetensors: values must be finite"):
        AutoModelForCausalLM.from_pretrained(out)


def test_zero_point_off_the_grid_in_a_checkpoint_is_an_error(fp_dir, tmp_path):
    out = tmp_path / "q"
    _quantized(fp_dir, {**INT4, "zero_point": "integer"}).save_pretrained(out)
    key = "model.layers.0.mlp.up_proj.weight_zero"

    def mutate(t):
        t[key][2, 0] = 16  # a 4-bit grid has zero points 0..15

    _rewrite(out / "model.safetensors", mutate)
    with pytest.raises(
        CheckpointError, match=rf"tensor '{key}' in model\.safetensors: zero points must be .* \[0, 15\]"
    ):
        AutoModelForCausalLM.from_pretrained(out)


def test_a_sound_checkpoint_still_loads_bit_identically(fp_dir, tmp_path):
    q = _quantized(fp_dir)
    q.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), _logits(q))


# --- non-finite values while quantizing --------------------------------------------------------------------


def test_quantizing_a_float_checkpoint_with_nan_weights_names_the_module(tmp_path):
    model = make_tiny_llama(seed=3, tie=False)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[4, 9] = float("nan")
    model.save_pretrained(tmp_path / "fp")
    with pytest.raises(
        NonFiniteError,
        match=r"model\.layers\.1\.mlp\.gate_proj: the float weight holds 1 inf/NaN value\(s\) \(first at row 4, column 9",
    ):
        _quantized(tmp_path / "fp")


def test_a_float16_scale_that_overflows_is_an_error_suggesting_a_wider_scale_dtype(tmp_path):
    model = make_tiny_llama(seed=3, tie=False)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = 1e6  # int4 scale ~ 1e6 / 15 > 65504
    model.save_pretrained(tmp_path / "fp")
    with pytest.raises(
        NonFiniteError, match=r"model\.layers\.0\.self_attn\.o_proj: weight_scale is not finite in float16.*'float32'"
    ):
        _quantized(tmp_path / "fp")
    q = _quantized(tmp_path / "fp", {**INT4, "scale_dtype": "float32"})  # the suggested fix works
    assert torch.isfinite(_logits(q)).all()


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_quantization_of_nan_weights_names_the_module(tmp_path, method, byte_tokenizer):
    model = make_tiny_llama(seed=3, tie=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1, 2] = float("inf")
    model.save_pretrained(tmp_path / "fp")
    byte_tokenizer.save_pretrained(tmp_path / "fp")
    cfg = EfficiencyConfig(
        quantization={"method": method, "bits": 4, "group_size": 32},
        calibration={
            "dataset": ["In the beginning God created the heaven and the earth."] * 4,
            "samples": 2,
            "sequence_length": 32,
        },
    )
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", efficiency_config=cfg)


# --- saves that cannot mix ---------------------------------------------------------------------------------


def _weight_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".index.json")))


def test_a_sharded_save_over_a_single_file_save_removes_the_stale_file(fp_dir, tmp_path):
    out = tmp_path / "q"
    old = _quantized(fp_dir)
    old.save_pretrained(out)
    assert _weight_files(out) == ["model.safetensors"]
    new = _quantized(fp_dir, {**INT4, "bits": 8})
    new.save_pretrained(out, max_shard_size="100KB")
    files = _weight_files(out)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files and len(files) > 2
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(new))


def test_save_keeps_unrelated_files_and_leaves_no_staging_folder(fp_dir, tmp_path, byte_tokenizer):
    out = tmp_path / "q"
    byte_tokenizer.save_pretrained(out)
    (out / "NOTES.txt").write_text("mine")
    _quantized(fp_dir).save_pretrained(out)
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "tokenizer.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["fp", "q"]


def test_every_shard_and_the_index_carry_one_save_id(fp_dir, tmp_path):
    out = tmp_path / "q"
    _quantized(fp_dir).save_pretrained(out, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    save_id = index["metadata"][SAVE_ID_KEY]
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(out / shard, "pt") as fh:
            assert fh.metadata()[SAVE_ID_KEY] == save_id


def test_shards_of_two_saves_are_refused(fp_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _quantized(fp_dir).save_pretrained(a, max_shard_size="100KB")
    _quantized(fp_dir).save_pretrained(b, max_shard_size="100KB")  # same model, same shard names, another save
    shard = sorted(n for n in os.listdir(a) if n.startswith("model-"))[1]
    (a / shard).write_bytes((b / shard).read_bytes())
    with pytest.raises(CheckpointError, match=rf"the weight files come from different saves \(.*{shard}: save "):
        AutoModelForCausalLM.from_pretrained(a)


def test_a_save_killed_between_shards_leaves_the_earlier_save_intact(fp_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    out = tmp_path / "q"
    old = _quantized(fp_dir)
    old.save_pretrained(out, max_shard_size="100KB")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    real, written = mu.safe_save_file, []

    def killed_after_two_shards(tensors, filename, metadata=None):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies here
        written.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mu, "safe_save_file", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        _quantized(fp_dir, {**INT4, "bits": 8}).save_pretrained(out, max_shard_size="100KB")
    monkeypatch.undo()
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["fp", "q"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(old))


def test_quantizing_moe_experts_with_a_nan_names_the_expert(tmp_path):
    from family_models import make_family_model

    model = make_family_model("qwen3_moe", seed=1)
    experts = model.model.layers[1].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[2, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "fp")
    with pytest.raises(
        NonFiniteError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_projs\.2: the float weight holds 1"
    ):
        _quantized(tmp_path / "fp")


def test_a_killed_saves_staging_folder_is_removed_and_a_live_ones_kept(fp_dir, tmp_path):
    import socket
    import subprocess
    import sys

    host = socket.gethostname().replace("-", "_")[:32]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".q.saving-{host}-{int(dead.stdout)}-deadbeef"
    live = tmp_path / f".q.saving-{host}-1-cafecafe"  # pid 1 is alive: another process saving right now
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    _quantized(fp_dir).save_pretrained(tmp_path / "q")
    assert not abandoned.exists() and live.exists()


def test_a_rank_that_does_not_save_stages_nothing(fp_dir, tmp_path, monkeypatch):
    model = _quantized(fp_dir)
    monkeypatch.setattr(type(model), "should_save_on_this_rank", lambda self, is_main: False)
    busy = tmp_path / ".q.saving-otherhost-123-abcdabcd"  # rank 0 writing (another host: never touched)
    busy.mkdir()
    model.save_pretrained(tmp_path / "q")
    assert busy.exists()
    assert not any(n.endswith(".safetensors") for n in os.listdir(tmp_path / "q"))
    assert sorted(os.listdir(tmp_path)) == [".q.saving-otherhost-123-abcdabcd", "fp", "q"]
