"""The plugin inside from_pretrained / save_pretrained: modules, round trips, registration."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_efficiency
from hf_efficiency import EfficiencyConfig, QuantLinear
from hf_efficiency.evaluate import weight_bytes
from hf_efficiency.integration.checkpoint import CheckpointError
from hf_efficiency.quant.core.scheme import quantize_weight

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INT4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "clip": "mse"}


@pytest.fixture
def fp_dir(tmp_path):
    model = make_tiny_llama(seed=3, tie=False)
    path = tmp_path / "fp"
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, torch.nn.Linear))}


def test_efficiency_config_kwarg_on_auto_and_concrete_classes(fp_dir, ids):
    path, fp = fp_dir
    cfg = EfficiencyConfig(quantization=INT4)
    auto = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)
    concrete = LlamaForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    alias = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    for m in (auto, concrete, alias):
        kinds = {n: type(mod).__name__ for n, mod in _linears(m).items()}
        assert kinds["lm_head"] == "Linear"
        assert sum(k == "QuantLinear" for k in kinds.values()) == 14  # 2 layers x 7 projections
        assert m.is_quantized and m.config.quantization_config.quantization.bits == 4
    assert torch.equal(auto(ids).logits, concrete(ids).logits)
    assert torch.equal(auto(ids).logits, alias(ids).logits)
    # the user's config object is not mutated by loading
    assert cfg.base_model is None


def test_modules_hold_exactly_the_reference_quantization(fp_dir):
    path, fp = fp_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    layer = q.model.layers[1].mlp.down_proj
    ref = quantize_weight(fp.model.layers[1].mlp.down_proj.weight, 4, 32, False, "mse")
    assert torch.equal(layer.weight, ref.packed) and torch.equal(layer.weight_scale, ref.scale)
    assert torch.equal(layer.weight_min, ref.minimum)
    assert layer.weight.dtype == torch.int32 and layer.weight.shape == (64, 4 * 4)
    assert not any(p.requires_grad for p in layer.parameters())


def test_both_keywords_is_an_error(fp_dir):
    path, _ = fp_dir
    cfg = EfficiencyConfig(quantization=INT4)
    with pytest.raises(ValueError, match="pass either efficiency_config= or quantization_config=, not both"):
        AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg, quantization_config=cfg)


def test_modules_to_not_convert_patterns_and_no_match_error(fp_dir):
    path, _ = fp_dir
    q = AutoModelForCausalLM.from_pretrained(
        path,
        efficiency_config={"quantization": {**INT4, "modules_to_not_convert": ["lm_head", r".*\.mlp\..*", "v_proj"]}},
    )
    kinds = {n: type(m).__name__ for n, m in _linears(q).items()}
    assert kinds["model.layers.0.mlp.gate_proj"] == "Linear" and kinds["model.layers.1.self_attn.v_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "QuantLinear"
    assert sum(k == "QuantLinear" for k in kinds.values()) == 6
    with pytest.raises(ValueError, match="quantization matched no nn.Linear module"):
        AutoModelForCausalLM.from_pretrained(
            path, efficiency_config={"quantization": {**INT4, "modules_to_not_convert": [".*"]}}
        )


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, 32, False), (3, 64, False), (2, 32, True)])
def test_save_reload_fresh_process_identical_logits(fp_dir, tmp_path, ids, bits, group, sym):
    path, _ = fp_dir
    cfg = {"quantization": {"bits": bits, "group_size": group, "symmetric": sym, "clip": "mse"}}
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)
    out = tmp_path / "q"
    q.save_pretrained(out)
    logits = q(ids).logits
    torch.save({"ids": ids, "logits": logits}, tmp_path / "ref.pt")
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_efficiency" and saved["quantization"]["bits"] == bits
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert fh.metadata()["hf_efficiency_format_version"] == str(hf_efficiency.FORMAT_VERSION)
        assert fh.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "I32"
    code = f"""
import torch, hf_efficiency
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / "ref.pt")!r})
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
assert type(m.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
assert torch.equal(m(ref["ids"]).logits, ref["logits"]), "logits differ"
print("IDENTICAL")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert "IDENTICAL" in r.stdout, r.stderr[-3000:]


def test_sharded_save_reloads(fp_dir, tmp_path, ids):
    path, _ = fp_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    q.save_pretrained(tmp_path / "sh", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "sh"))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-000") for f in files) > 2
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sh")
    assert torch.equal(again(ids).logits, q(ids).logits)


def test_dequantize_gives_float_model_with_same_logits(fp_dir, ids):
    path, _ = fp_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    before = q(ids).logits
    fp = q.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in fp.modules())
    assert not getattr(fp, "is_quantized", False) and not hasattr(fp.config, "quantization_config")
    assert torch.allclose(fp(ids).logits, before, atol=1e-5)


def test_bytes_in_memory_match_bits_plus_overhead(fp_dir):
    path, _ = fp_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    wb = weight_bytes(q)
    n_weights = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)  # per layer: q,o + k,v + gate,up,down
    groups = 2 * (64 * 2 * 2 + 32 * 2 * 2 + (128 * 2 * 2 + 64 * 4))  # scale+min, fp16
    assert wb["quantized_params"] == n_weights
    assert wb["quantized"] == n_weights * 4 // 8 + groups * 2 * 2
    assert wb["bits_per_weight"] == pytest.approx(4 + 2 * 16 / 32)


def test_register_is_idempotent_and_reload_safe(fp_dir, ids):
    from transformers.quantizers import auto

    hf_efficiency.register()
    hf_efficiency.register()
    importlib.reload(hf_efficiency)
    assert auto.AUTO_QUANTIZER_MAPPING["hf_efficiency"].__name__ == "EfficiencyHfQuantizer"
    path, _ = fp_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import hf_efficiency, importlib; import hf_efficiency as h; importlib.reload(h); h.register(); print('OK')",
        ],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.stdout.strip() == "OK", r.stderr[-2000:]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture
def saved_int4(fp_dir, tmp_path):
    path, _ = fp_dir
    q = AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": INT4})
    out = tmp_path / "q4"
    q.save_pretrained(out)
    return out


def test_plugin_installed_but_not_imported_loads_via_autoload_hook(saved_int4, tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "hf_efficiency_autoload.pth").write_text(open(os.path.join(REPO, "hf_efficiency_autoload.pth")).read())
    code = f"""
import site, sys
site.addsitedir({str(site_dir)!r})
assert "hf_efficiency" not in sys.modules and "torch" not in sys.modules  # the hook is import-light
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(saved_int4)!r})
print(type(m.model.layers[0].self_attn.q_proj).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert r.stdout.strip().endswith("QuantLinear"), r.stderr[-3000:]


def test_plugin_absent_fails_loudly_never_garbage(saved_int4, tmp_path):
    # With the hook disabled and hf_efficiency never imported, transformers alone sees the checkpoint,
    # exactly as on a machine without the plugin: packed int32 words never fit the float shapes.
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_efficiency" or name.startswith("hf_efficiency."):
            raise ImportError("hf_efficiency is not installed")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(saved_int4)!r})
print("LOADED")
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(HF_EFFICIENCY_NO_AUTOLOAD="1"),
        cwd=tmp_path,
    )
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "size mismatch" in r.stderr.lower() or "ignore_mismatched_sizes" in r.stderr
    assert "hf_efficiency" in r.stderr  # transformers names the unknown quantization type


def _rewrite(path, mutate):
    with safe_open(path, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    mutate(tensors)
    save_file(tensors, path, metadata=meta)


def test_missing_scale_tensor_is_a_clear_error(saved_int4):
    _rewrite(saved_int4 / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint is missing tensor 'model.layers.1.mlp.up_proj.weight_scale' \(expected F16 \[128, 2\]\)",
    ):
        AutoModelForCausalLM.from_pretrained(saved_int4)


def test_wrong_shape_is_a_clear_error(saved_int4):
    def mutate(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:, :4].contiguous()

    _rewrite(saved_int4 / "model.safetensors", mutate)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.0.self_attn.k_proj.weight' in model.safetensors has shape \[32, 4\], expected \[32, 8\]",
    ):
        AutoModelForCausalLM.from_pretrained(saved_int4)


def test_wrong_dtype_is_a_clear_error(saved_int4):
    def mutate(t):
        t["model.layers.0.self_attn.k_proj.weight_min"] = t["model.layers.0.self_attn.k_proj.weight_min"].float()

    _rewrite(saved_int4 / "model.safetensors", mutate)
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.self_attn.k_proj.weight_min' in model.safetensors has dtype F32, expected F16",
    ):
        AutoModelForCausalLM.from_pretrained(saved_int4)


def test_truncated_file_is_a_clear_error(saved_int4):
    f = saved_int4 / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: file is truncated: 1000 bytes missing"):
        AutoModelForCausalLM.from_pretrained(saved_int4)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="file is truncated"):
        AutoModelForCausalLM.from_pretrained(saved_int4)


def test_newer_format_version_in_config_json_is_refused(saved_int4):
    cfg_path = saved_int4 / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 99.*pip install -U hf-efficiency"):
        AutoModelForCausalLM.from_pretrained(saved_int4)
