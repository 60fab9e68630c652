"""The family support matrix: every described family (tiny random models built from each family's transformers
config, `family_models.py`) x every capability. `benchmarks/support_matrix.py` runs this file (with the memory
tests in `tests/memory/test_families.py`) and renders the README's support table from the outcomes, so each
cell of that table is one of these tests.

Capabilities: quantization with each method (RTN, HQQ, AWQ, GPTQ, W8A8 with SmoothQuant) saved and reloaded in
a fresh process bit-identically; AWQ/SmoothQuant scale folding leaving the float model unchanged; speculative
decoding greedy-identical; a LoRA and a QLoRA training step; and the errors for an undescribed family.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer
from family_models import FAMILIES, MOE_FAMILIES, family_config, make_family_model
from transformers import AutoConfig, AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import kjv_text
from hf_efficiency.families import (
    UnsupportedFamilyError,
    family_of,
    find_decoder_layers,
    require_family,
)
from hf_efficiency.quant import QuantLinear
from hf_efficiency.quant.calibrated.pipeline import fold_group, scaling_groups

CAL_TEXT = kjv_text("calibration")[:6000]
METHODS = {
    "rtn": {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}},
    "hqq": {"quantization": {"method": "hqq", "bits": 4, "group_size": 32}},
    "awq": {"quantization": {"method": "awq", "bits": 4, "group_size": 32}},
    "gptq": {"quantization": {"method": "gptq", "bits": 4, "group_size": 32}},
    "w8a8": {
        "quantization": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
        "activations": {"mode": "dynamic", "smoothquant": 0.5},
    },
}
#: relative logits error bound of each method on the tiny models (4-bit: measured 0.005-0.34 across families,
#: the Gemma models' random (1 + w) norms are the hardest; int8 weights + int8 activations: 0.0015-0.031)
ERROR_BOUND = {"rtn": 0.5, "hqq": 0.5, "awq": 0.5, "gptq": 0.5, "w8a8": 0.06}
#: scaling groups that apply on the tiny models with one value head per query head
GROUP_COUNT = {"gpt2": 3, "qwen2_moe": 3, "qwen3_moe": 2, "mixtral": 2}
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _calibration() -> dict:
    return {"dataset": [CAL_TEXT], "samples": 4, "sequence_length": 32, "batch_size": 2}


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    tok = make_byte_tokenizer()
    out = {}
    for fam in FAMILIES:
        path = root / fam
        make_family_model(fam, equal_heads=True).save_pretrained(path)
        tok.save_pretrained(path)
        out[fam] = path
    return out


_RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
ids = torch.load(sys.argv[2])
for folder in jobs:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = model(ids).logits
        torch.save({"logits": logits, "state": {k: v.clone() for k, v in model.state_dict().items()}},
                   folder + "/fresh.pt")
    except Exception as e:
        open(folder + "/fresh.err", "w").write(f"{type(e).__name__}: {e}")
"""


@pytest.fixture(scope="module")
def quantized(float_dirs, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every family quantized with every method, saved; then one fresh process reloads every folder."""
    root = tmp_path_factory.mktemp("quantized")
    results = {}
    for fam, src in float_dirs.items():
        ref = None
        for method, cfg in METHODS.items():
            entry = results[(fam, method)] = {}
            try:
                if ref is None:
                    with torch.no_grad():
                        ref = AutoModelForCausalLM.from_pretrained(src)(IDS).logits
                model = AutoModelForCausalLM.from_pretrained(
                    src, efficiency_config={**cfg, "calibration": _calibration()}
                )
                with torch.no_grad():
                    entry["logits"] = model(IDS).logits
                entry["ref"] = ref
                entry["state"] = {k: v.clone() for k, v in model.state_dict().items()}
                entry["modules"] = {n: type(m).__name__ for n, m in model.named_modules()}
                folder = root / f"{fam}-{method}"
                model.save_pretrained(folder)
                entry["folder"] = str(folder)
            except Exception as e:  # noqa: BLE001 - reported by the test of this cell
                entry["error"] = e
    ids_file = root / "ids.pt"
    torch.save(IDS, ids_file)
    jobs = [e["folder"] for e in results.values() if "folder" in e]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", _RELOAD, json.dumps(jobs), str(ids_file)], check=True, env=env, timeout=600)
    return results


# --- quantization: every method, saved and reloaded in a fresh process ---------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_and_reload_in_a_fresh_process(quantized, family, method):
    entry = quantized[(family, method)]
    if "error" in entry:
        raise entry["error"]
    folder = Path(entry["folder"])
    assert not (folder / "fresh.err").exists(), (folder / "fresh.err").read_text()
    fresh = torch.load(folder / "fresh.pt")
    assert torch.equal(fresh["logits"], entry["logits"])
    assert fresh["state"].keys() == entry["state"].keys()
    assert all(torch.equal(fresh["state"][k], v) for k, v in entry["state"].items())
    err = ((entry["logits"] - entry["ref"]).norm() / entry["ref"].norm()).item()
    assert 0 < err < ERROR_BOUND[method], err
    # every linear of the decoder layers is quantized (routers stay float)
    fam = family_of(AutoConfig.from_pretrained(folder))
    kinds = {n: k for n, k in entry["modules"].items() if ".layers.0." in n or ".h.0." in n}
    for role, names in fam.roles.items():
        for name in names:
            (kind,) = [k for n, k in kinds.items() if n.endswith(f".0.{name}")]
            assert kind == "QuantLinear", (role, name, kind)
    for never in fam.never_quantize:
        (kind,) = [k for n, k in kinds.items() if n.endswith(f".0.{never}")]
        assert kind != "QuantLinear"
    if fam.experts is not None:
        (kind,) = [k for n, k in kinds.items() if n.endswith(f".0.{fam.experts.module}")]
        assert kind == "QuantExperts"


# --- scale folding leaves the float model unchanged ----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_scale_folding_keeps_float_outputs(family):
    model = make_family_model(family, equal_heads=True)
    fam = family_of(model)
    with torch.no_grad():
        ref = model(IDS).logits
        _, layers = find_decoder_layers(model)
        g = torch.Generator().manual_seed(1)
        for layer in layers:
            groups = scaling_groups(layer, fam, model.config)
            assert len(groups) == GROUP_COUNT.get(family, 4)
            for group, consumers in groups:
                width = layer.get_submodule(consumers[0]).weight.shape[
                    -1 if "Linear" in type(layer.get_submodule(consumers[0])).__name__ else 0
                ]
                before = layer.get_submodule(group.producer).weight.clone()
                fold_group(layer, group, fam, torch.rand(width, generator=g) * 4 + 0.25)
                assert not torch.equal(layer.get_submodule(group.producer).weight, before)
        out = model(IDS).logits
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5  # float32 rounding only (measured <= 1e-6)


def test_value_to_output_folding_is_skipped_with_grouped_query_attention():
    model = make_family_model("llama")  # 4 query heads share 2 value heads
    groups = scaling_groups(model.model.layers[0], family_of(model), model.config)
    assert [g.producer for g, _ in groups] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]


# --- speculative decoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_decoding_is_greedy_identical(family):
    model = make_family_model(family, num_hidden_layers=3)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    for draft in ("early-exit:1", "int8"):
        out = model.generate(ids, max_new_tokens=16, do_sample=False, draft_model=draft, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain), draft
        assert out.speculative_stats.drafted > 0


# --- LoRA and QLoRA ------------------------------------------------------------------------------------
def _train_step(model, targets) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    return losses[0], losses[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_step(family):
    model = make_family_model(family)
    first, last = _train_step(model, family_of(model).lora_attention_targets)
    assert torch.isfinite(torch.tensor(last)) and last < first


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_training_step(float_dirs, family):
    model = AutoModelForCausalLM.from_pretrained(
        float_dirs[family], efficiency_config={"quantization": {"method": "rtn", "bits": 4, "group_size": 32}}
    )
    targets = family_of(model).lora_attention_targets
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith(targets))
    first, last = _train_step(model, targets)
    assert torch.isfinite(torch.tensor(last)) and last < first


# --- an undescribed family -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    """GPT-NeoX: a family we do not describe."""
    path = tmp_path_factory.mktemp("neox")
    config = AutoConfig.for_model(
        "gpt_neox",
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=256,
        pad_token_id=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["awq", "w8a8"])
def test_undescribed_family_with_a_folding_method_names_the_family_and_what_is_missing(neox_dir, method):
    assert family_of(AutoConfig.from_pretrained(neox_dir)) is None
    cfg = EfficiencyConfig(**{**METHODS[method], "calibration": _calibration()})
    with pytest.raises(UnsupportedFamilyError, match=r"'gpt_neox' \(GPTNeoXForCausalLM\).*which norm feeds which"):
        AutoModelForCausalLM.from_pretrained(neox_dir, efficiency_config=cfg)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_undescribed_family_takes_the_generic_path_where_one_exists(neox_dir, method):
    model = AutoModelForCausalLM.from_pretrained(
        neox_dir, efficiency_config={**METHODS[method], "calibration": _calibration()}
    )
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 8  # 4 linears x 2 layers


def test_require_family_and_register_family():
    from hf_efficiency.families import FAMILIES as REGISTRY
    from hf_efficiency.families import Family, ScalingGroup, register_family

    config = family_config("llama")
    assert require_family(config, "x").name == "llama"
    with pytest.raises(ValueError, match="already described"):
        register_family(Family("mine", ("llama",)))
    with pytest.raises(ValueError, match="Family.norm must be one of"):
        Family("mine", ("mine",), norm="batch")
    fam = register_family(Family("mine", ("mine_type",), scaling_groups=(ScalingGroup("ln", ("fc",)),)))
    try:
        assert family_of({"model_type": "mine_type"}) is fam
    finally:
        del REGISTRY["mine_type"]


def test_moe_families_describe_their_fused_experts():
    for family in MOE_FAMILIES:
        model = make_family_model(family)
        fam = family_of(model)
        experts = model.get_submodule(f"{find_decoder_layers(model)[0]}.0.{fam.experts.module}")
        e, two_i, h = getattr(experts, fam.experts.gate_up).shape
        assert e == getattr(model.config, fam.experts.num_experts_attr) == 4
        assert h == 64 and two_i == 2 * getattr(model.config, fam.experts.intermediate_attr)


# --- attention implementations and the quantized KV cache ---------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_attention_matches_eager(float_dirs, family):
    """The exact block-wise attention ("flash" on CPU) computes what eager attention computes, soft-capping
    and sliding windows included."""
    eager = AutoModelForCausalLM.from_pretrained(float_dirs[family], attn_implementation="eager")
    blockwise = AutoModelForCausalLM.from_pretrained(float_dirs[family], attn_implementation="hf_efficiency_blockwise")
    assert blockwise.config._attn_implementation == "hf_efficiency_blockwise"
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))  # longer than the windows
    with torch.no_grad():
        ref, out = eager(ids).logits, blockwise(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_kv_cache_decodes(float_dirs, family):
    """Greedy decoding with int8 keys and values (`QuantizedKVCache`) follows the float cache's tokens."""
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    plain = AutoModelForCausalLM.from_pretrained(float_dirs[family])
    ref = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    model = AutoModelForCausalLM.from_pretrained(
        float_dirs[family], efficiency_config={"attention": {"kv_cache_bits": 8, "kv_group_size": 16}}
    )
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
