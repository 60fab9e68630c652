"""Sequential onloading (`quantize_sequential`): the folder it writes one layer at a time is the in-memory
pipeline's ``save_pretrained`` output key for key and bit for bit, loads with plain ``from_pretrained``, and
no more than one decoder layer is ever materialized."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from family_models import FAMILIES, MOE_FAMILIES, make_family_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig
from hf_efficiency.integration import sequential
from hf_efficiency.integration.sequential import quantize_sequential, resolve_source, should_onload
from hf_efficiency.quant.calibrated.onload import LayerOnloader, SequentialOnloadError

CAL = {"samples": 4, "sequence_length": 64}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as fh:
                for k in fh.keys():
                    assert k not in out, f"{k} stored twice"
                    out[k] = fh.get_tensor(k)
    return out


def _source(tmp_path, tie: bool, layers: int = 3):
    from transformers import GenerationConfig

    src = tmp_path / "src"
    model = make_tiny_llama(0, tie=tie, num_hidden_layers=layers)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=[256, 5])
    model.save_pretrained(src, max_shard_size="100KB")
    make_byte_tokenizer().save_pretrained(src)
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 1  # really sharded
    return src


@pytest.mark.parametrize(
    "method, tie, quantization",
    [
        ("gptq", False, {}),
        ("awq", True, {}),  # the tied head stays float: it is the embedding, stored once
        ("gptq", True, {"modules_to_not_convert": []}),  # the tied head is untied and quantized (round-to-nearest)
        ("rtn", False, {"bits": 8, "symmetric": True}),
        # data-free: no calibration pass (in memory these quantize on the fly while loading)
        ("rtn", True, {"modules_to_not_convert": [], "outliers": 0.05, "calibration": None}),
        ("hqq", False, {"calibration": None}),
    ],
    ids=["gptq", "awq-tied-head", "gptq-quantized-head", "rtn-w8", "rtn-data-free-head", "hqq-data-free"],
)
def test_sequential_equals_in_memory_bit_for_bit(tmp_path, method, tie, quantization):
    src = _source(tmp_path, tie)
    quantization = dict(quantization)
    calibration = quantization.pop("calibration", CAL)
    cfg = EfficiencyConfig(
        quantization={"method": method, "bits": 4, "group_size": 32, **quantization}, calibration=calibration
    )
    assert cfg.needs_calibration == (calibration is not None and method != "rtn")
    memory = AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg, dtype=torch.float32)
    memory.save_pretrained(tmp_path / "memory")
    report = quantize_sequential(src, cfg, tmp_path / "seq", progress=False)

    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "seq")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in ("config.json", "generation_config.json"):  # the source's generation config, read as loading does
        assert json.loads((tmp_path / "memory" / name).read_text()) == json.loads((tmp_path / "seq" / name).read_text())
    index = json.loads((tmp_path / "seq" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == memory.num_parameters()
    assert sorted(set(index["weight_map"].values())) == [
        f"model-{i:05d}-of-{report.shards:05d}.safetensors" for i in range(1, report.shards + 1)
    ]
    # the float parts before the layers, one shard per layer, the head (none when it is the tied embedding)
    head_is_embedding = tie and "modules_to_not_convert" not in quantization
    assert report.shards == 1 + 3 + (0 if head_is_embedding else 1)
    assert report.tensors == len(b)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "seq")
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, memory(x).logits)


def test_one_decoder_layer_at_a_time(tmp_path, monkeypatch):
    src = _source(tmp_path, tie=False, layers=4)
    seen = []
    original = LayerOnloader.load

    def load(self, module, prefix="", exclude=()):
        original(self, module, prefix, exclude)
        model = self.model_for_test
        real = [
            i for i, layer in enumerate(model.model.layers) if any(not t.is_meta for t in layer.state_dict().values())
        ]
        seen.append((prefix, real, model.model.embed_tokens.weight.is_meta))

    built = sequential.build_skeleton

    def build(folder, dtype):
        model = built(folder, dtype)
        monkeypatch.setattr(LayerOnloader, "model_for_test", model, raising=False)
        return model

    monkeypatch.setattr(LayerOnloader, "load", load)
    monkeypatch.setattr(sequential, "build_skeleton", build)
    cfg = EfficiencyConfig(quantization={"method": "gptq", "bits": 4, "group_size": 32}, calibration=CAL)
    quantize_sequential(src, cfg, tmp_path / "seq", progress=False)
    # first the parts before the layers (no layer real), then each layer alone, the embedding already written
    assert seen[0] == ("", [], False)
    assert seen[1:5] == [(f"model.layers.{i}.", [i], True) for i in range(4)]
    assert seen[5] == ("lm_head.", [], True)  # the untied float head, read after the layers
    assert len(seen) == 6


def test_refused_configurations_say_why(tmp_path):
    src = _source(tmp_path, tie=False, layers=2)
    base = {"method": "rtn", "bits": 4, "group_size": 32}
    with pytest.raises(SequentialOnloadError, match="rotation='hadamard' rotates every weight"):
        quantize_sequential(src, {"quantization": {**base, "rotation": "hadamard"}}, tmp_path / "a")
    with pytest.raises(SequentialOnloadError, match="target_bits measures every module's sensitivity"):
        quantize_sequential(src, {"quantization": {**base, "target_bits": 3.0}}, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpoint_problems_are_named(tmp_path):
    src = _source(tmp_path, tie=False, layers=2)
    cfg = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}, "calibration": CAL}
    # a tensor missing from the checkpoint
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    shard = [f for f in os.listdir(src) if f.endswith(".safetensors")]
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(src):
        if "safetensors" not in f:
            (bare / f).write_bytes((src / f).read_bytes())
    with pytest.raises(SequentialOnloadError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        quantize_sequential(bare, cfg, tmp_path / "out1", progress=False)
    # a shard that lacks a tensor the model has
    from safetensors.torch import load_file, save_file

    holder = next(f for f in shard if "model.layers.1.mlp.up_proj.weight" in load_file(src / f))
    tensors = load_file(src / holder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / holder, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SequentialOnloadError, match="has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        quantize_sequential(src, cfg, tmp_path / "out2", progress=False)
    # refused from the shard headers before any work; nothing half-written is published or left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "src"]


def test_hub_cache_snapshot_is_a_source(tmp_path, monkeypatch):
    """A repo id resolves to its snapshot in the Hub cache (offline here: no download is attempted)."""
    import huggingface_hub.constants as hub_constants

    src = _source(tmp_path, tie=False, layers=2)
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in os.listdir(src):
        (snapshot / f).write_bytes((src / f).read_bytes())
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert os.path.samefile(resolve_source("someone/tiny-llama", cache_dir=str(cache)), snapshot)
    cfg = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}, "calibration": CAL}
    report = quantize_sequential("someone/tiny-llama", cfg, tmp_path / "out", progress=False, cache_dir=str(cache))
    assert report.tensors == len(_tensors(tmp_path / "out"))


def test_should_onload_uses_the_estimate(tmp_path):
    src = _source(tmp_path, tie=False, layers=2)
    cfg = EfficiencyConfig(quantization={"method": "gptq", "bits": 4, "group_size": 32}, calibration=CAL)
    need = sequential.in_memory_bytes(src, cfg)
    assert need > 400 * 2**20  # the runtime's own memory is part of it
    assert should_onload(src, cfg, available=need - 1) is True
    assert should_onload(src, cfg, available=need) is False
    rotated = EfficiencyConfig(
        quantization={"method": "gptq", "bits": 4, "group_size": 32, "rotation": "hadamard"}, calibration=CAL
    )
    assert should_onload(src, rotated, available=1) is False  # cannot stream: in memory, with a warning
    data_free = EfficiencyConfig(quantization={"method": "rtn", "bits": 4, "group_size": 32})
    assert should_onload(src, data_free, available=1) is False  # quantized tensor by tensor while loading
    moe = tmp_path / "moe"
    make_family_model("mixtral").save_pretrained(moe)
    make_byte_tokenizer().save_pretrained(moe)
    assert should_onload(moe, cfg, available=1) is False  # per-expert checkpoint: in memory, with a warning


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE_FAMILIES])
def test_every_dense_family_streams_bit_for_bit(tmp_path, family):
    """AWQ (scales folded into each family's norms and linears) one layer at a time equals AWQ in memory, for
    every dense family we support (GPT-2's Conv1D weights are read transposed, as the pipeline linearizes them)."""
    src = tmp_path / "src"
    make_family_model(family).save_pretrained(src, max_shard_size="200KB")
    make_byte_tokenizer().save_pretrained(src)
    cfg = EfficiencyConfig(quantization={"method": "awq", "bits": 4, "group_size": 32}, calibration=CAL)
    AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg, dtype=torch.float32).save_pretrained(
        tmp_path / "memory"
    )
    quantize_sequential(src, cfg, tmp_path / "seq", progress=False)
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "seq")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "memory" / "config.json").read_text()) == json.loads(
        (tmp_path / "seq" / "config.json").read_text()
    )


def test_per_expert_checkpoints_are_refused_naming_the_layout(tmp_path):
    src = tmp_path / "src"
    make_family_model("mixtral").save_pretrained(src)
    make_byte_tokenizer().save_pretrained(src)
    cfg = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}, "calibration": CAL}
    with pytest.raises(
        SequentialOnloadError,
        match=r"stores model\.layers\.0 as tensors the model does not name .* lacks 'model\.layers\.0\.mlp\.experts\.",
    ):
        quantize_sequential(src, cfg, tmp_path / "out", progress=False)


def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from hf_efficiency.quant.calibrated import pipeline

    src = _source(tmp_path, tie=False, layers=3)
    real = pipeline.quantize_matrix

    def failing(weight, spec, bits, *, name="weight", **kwargs):
        if name.startswith("model.layers.1."):
            raise RuntimeError("disk full")
        return real(weight, spec, bits, name=name, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_matrix", failing)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("an earlier folder")
    cfg = {"quantization": {"method": "gptq", "bits": 4, "group_size": 32}, "calibration": CAL}
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_sequential(src, cfg, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging folder left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["README.md"]
