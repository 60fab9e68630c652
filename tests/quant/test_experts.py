"""Quantized mixture-of-experts: transformers 5's fused expert tensors (Qwen3-MoE, Mixtral, Qwen2-MoE) become
`QuantExperts` (one `QuantLinear` per expert matrix) inside ``from_pretrained``; save/reload in a fresh process
is bit-identical; only routed experts run, through the QuantLinear kernels; routers stay float; calibrated
methods fall back to round-to-nearest for experts; exports refuse; the memory estimate counts them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_efficiency  # noqa: F401 - registers the quantizer
from hf_efficiency.config import QuantizationSpec
from hf_efficiency.demo import kjv_text
from hf_efficiency.evaluate import weight_bytes
from hf_efficiency.export import ExportError, export_model
from hf_efficiency.integration.checkpoint import CheckpointError
from hf_efficiency.memory import estimate_memory
from hf_efficiency.quant import QuantExperts, QuantLinear
from hf_efficiency.quant.kernels import cpu as cpu_kernel
from hf_efficiency.quant.methods import quantize_matrix

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
NUM_EXPERTS, TOP_K = 4, 2
RTN4 = {"method": "rtn", "bits": 4, "group_size": 32}
RTN8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}
HQQ4 = {"method": "hqq", "bits": 4, "group_size": 32}
# measured on these tiny random models (weights ~ N(0, 0.02)): relative error of the expert weights
# (rtn4 0.079, hqq4 0.074, rtn8 0.006), of one experts module's output on the same routing (rtn4 0.133-0.139,
# hqq4 0.125-0.132, rtn8 0.010-0.011) and of the logits (rtn4 0.091-0.116, hqq4 0.083-0.120, rtn8 0.007-0.008)
BOUNDS = {"rtn4": (0.09, 0.16, 0.14), "hqq4": (0.09, 0.16, 0.14), "rtn8": (0.007, 0.013, 0.011)}
SCHEMES = {"rtn4": RTN4, "hqq4": HQQ4, "rtn8": RTN8}


def _config(kind: str):
    common = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=BYTE_VOCAB, num_experts_per_tok=TOP_K, eos_token_id=256, pad_token_id=256, bos_token_id=None,
    )  # fmt: skip
    if kind == "mixtral":
        return AutoConfig.for_model("mixtral", num_local_experts=NUM_EXPERTS, intermediate_size=32, **common)
    extra = {"shared_expert_intermediate_size": 64} if kind == "qwen2_moe" else {}
    return AutoConfig.for_model(
        kind, intermediate_size=128, moe_intermediate_size=32, num_experts=NUM_EXPERTS, **extra, **common
    )


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    """``{family: (folder, float model)}``: tiny float MoE checkpoints (per-expert keys, as transformers saves
    them) with the byte tokenizer."""
    out = {}
    for i, kind in enumerate(FAMILIES):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_config(_config(kind)).eval()
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        make_byte_tokenizer().save_pretrained(path)
        out[kind] = (path, model)
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _load(path, quant: dict, **extra):
    return AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": quant, **extra})


def _moe(model, i: int):
    return model.model.layers[i].mlp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _assert_expert_reference(q, fp, spec: QuantizationSpec) -> None:
    """Each expert matrix holds exactly what ``quantize_matrix`` makes of the float expert matrix."""
    for i in range(2):
        qe, fe = _moe(q, i).experts, _moe(fp, i).experts
        for linears, fused in ((qe.gate_up_projs, fe.gate_up_proj), (qe.down_projs, fe.down_proj)):
            for e, linear in enumerate(linears):
                ref = quantize_matrix(fused[e], spec, spec.bits, scale_dtype=torch.float16)
                assert torch.equal(linear.weight, ref.packed) and torch.equal(linear.weight_scale, ref.scale)
                assert (linear.weight_min is None) == (ref.minimum is None)
                assert linear.weight_min is None or torch.equal(linear.weight_min, ref.minimum)


# --- on-the-fly quantization inside from_pretrained ------------------------------------------------------
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("kind", FAMILIES)
def test_experts_quantized_on_the_fly_close_to_float_routers_float(float_dirs, ids, kind, scheme):
    path, fp = float_dirs[kind]
    quant = SCHEMES[scheme]
    q = _load(path, quant)
    spec = QuantizationSpec(**quant)
    max_weight, max_module, max_logits = BOUNDS[scheme]
    g = torch.Generator().manual_seed(2)
    for i in range(2):
        moe, float_moe = _moe(q, i), _moe(fp, i)
        experts = moe.experts
        assert isinstance(experts, QuantExperts) and experts.num_experts == NUM_EXPERTS
        linears = [*experts.gate_up_projs, *experts.down_projs]
        assert all(isinstance(m, QuantLinear) and m.bits == spec.bits for m in linears)
        assert (experts.gate_up_projs[0].in_features, experts.gate_up_projs[0].out_features) == (64, 64)
        assert (experts.down_projs[0].in_features, experts.down_projs[0].out_features) == (32, 64)
        # the router stays float, as do Qwen2-MoE's shared-expert gate; the shared expert itself is quantized
        assert moe.gate.weight.dtype == torch.float32 and torch.equal(moe.gate.weight, float_moe.gate.weight)
        if kind == "qwen2_moe":
            assert type(moe.shared_expert_gate) is torch.nn.Linear
            assert torch.equal(moe.shared_expert_gate.weight, float_moe.shared_expert_gate.weight)
            assert all(isinstance(getattr(moe.shared_expert, n), QuantLinear) for n in ("gate_proj", "up_proj"))
        # close to float: weights, one experts module on the same routing, the logits
        w = torch.stack([m.dequantize_weight() for m in experts.gate_up_projs])
        assert _rel(w, float_moe.experts.gate_up_proj) < max_weight
        x = torch.randn(64, 64, generator=g)
        index = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K] for _ in range(64)])
        weights = torch.rand(64, TOP_K, generator=g)
        with torch.no_grad():
            assert _rel(experts(x, index, weights), float_moe.experts(x, index, weights)) < max_module
    with torch.no_grad():
        assert _rel(q(ids).logits, fp(ids).logits) < max_logits
    _assert_expert_reference(q, fp, spec)  # rtn and hqq quantize each expert matrix themselves


# --- save -> reload in a fresh process -----------------------------------------------------------------
@pytest.mark.parametrize("kind,scheme", [("qwen3_moe", "rtn4"), ("mixtral", "hqq4"), ("qwen2_moe", "rtn8")])
def test_save_reload_fresh_process_bit_identical(float_dirs, tmp_path, ids, kind, scheme):
    path, _ = float_dirs[kind]
    q = _load(path, SCHEMES[scheme])
    out = tmp_path / "q"
    q.save_pretrained(out)
    saved = load_file(out / "model.safetensors")
    experts_keys = [k for k in saved if ".experts." in k]
    assert experts_keys and all(".gate_up_projs." in k or ".down_projs." in k for k in experts_keys)
    assert saved[experts_keys[0]].dtype in (torch.int32, torch.float16, torch.uint8)
    with torch.no_grad():
        logits = q(ids).logits
    code = f"""
import torch, hf_efficiency
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from hf_efficiency.quant import QuantExperts
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
assert all(isinstance(l.mlp.experts, QuantExperts) for l in m.model.layers)
ids = torch.tensor({ids.tolist()!r})
with torch.no_grad():
    logits = m(ids).logits
state = {{"sd." + k: v.contiguous() for k, v in m.state_dict().items()}}
save_file({{"logits": logits.contiguous(), **state}}, {str(tmp_path / "fresh.safetensors")!r})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = load_file(tmp_path / "fresh.safetensors")
    assert torch.equal(fresh.pop("logits"), logits)
    state = {k: v for k, v in q.state_dict().items()}
    assert set(fresh) == {"sd." + k for k in state}
    for k, v in state.items():
        assert fresh["sd." + k].dtype == v.dtype and torch.equal(fresh["sd." + k], v), k


def test_missing_expert_tensor_raises_checkpoint_error(float_dirs, tmp_path):
    path, _ = float_dirs["mixtral"]  # saved under Mixtral's block_sparse_moe names
    out = tmp_path / "q"
    _load(path, RTN4).save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.down_projs.3.weight_scale"
    del tensors[key]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.down_projs\.3"):
        AutoModelForCausalLM.from_pretrained(out)


def test_checkpoint_with_float_experts_loads_them_in_float(float_dirs, tmp_path, ids):
    """A checkpoint written before experts were quantized (linears packed, experts float) still loads."""
    path, _ = float_dirs["qwen3_moe"]
    keep = ["lm_head", "mlp.gate", "experts"]
    q = _load(path, {**RTN4, "modules_to_not_convert": keep})
    assert type(_moe(q, 0).experts).__name__ == "Qwen3MoeExperts"
    out = tmp_path / "old"
    q.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quantization"]["modules_to_not_convert"] = None  # as before this feature
    (out / "config.json").write_text(json.dumps(config))
    again = AutoModelForCausalLM.from_pretrained(out)
    assert type(_moe(again, 0).experts).__name__ == "Qwen3MoeExperts"
    assert isinstance(again.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)


def test_dequantize_restores_fused_float_experts(float_dirs, ids):
    path, _ = float_dirs["qwen2_moe"]
    q = _load(path, RTN4)
    with torch.no_grad():
        logits = q(ids).logits
    expected = torch.stack([m.dequantize_weight() for m in _moe(q, 1).experts.gate_up_projs])
    fp = q.dequantize()
    experts = _moe(fp, 1).experts
    assert type(experts).__name__ == "Qwen2MoeExperts" and experts.config is fp.config
    assert torch.equal(experts.gate_up_proj, expected)
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in fp.modules())
    with torch.no_grad():
        torch.testing.assert_close(fp(ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_fused_float_checkpoint_and_dense_layers(float_dirs, tmp_path, ids):
    """A float checkpoint holding the fused tensors (``save_original_format=False``) quantizes the same; a layer
    without experts (Qwen2-MoE ``mlp_only_layers``) keeps its dense MLP of QuantLinears."""
    path, fp = float_dirs["qwen3_moe"]
    fused = tmp_path / "fused"
    fp.save_pretrained(fused, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(_load(fused, RTN4)(ids).logits, _load(path, RTN4)(ids).logits)
    config = _config("qwen2_moe")
    config.mlp_only_layers = [0]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mixed")
    q = _load(tmp_path / "mixed", RTN4)
    assert isinstance(_moe(q, 0).down_proj, QuantLinear) and isinstance(_moe(q, 1).experts, QuantExperts)
    q.save_pretrained(tmp_path / "mixed_q")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "mixed_q")(ids).logits, q(ids).logits)


# --- generate: only routed experts run, through the QuantLinear kernels ----------------------------------
def test_generate_runs_only_routed_experts_through_quantlinear_kernels(float_dirs):
    path, _ = float_dirs["qwen3_moe"]
    q = _load(path, RTN4)
    assert not any(type(m).__name__ == "Qwen3MoeExperts" for m in q.modules())
    events: list[tuple] = []
    hooks = []
    for i, layer in enumerate(q.model.layers):
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda m, a, out, i=i: events.append(("route", i, set(out[2].flatten().tolist())))
        ))  # fmt: skip
        for list_name in ("gate_up_projs", "down_projs"):
            for e, linear in enumerate(getattr(layer.mlp.experts, list_name)):
                hooks.append(linear.register_forward_hook(
                    lambda m, a, out, i=i, n=list_name, e=e: events.append(("expert", i, n, e, m.last_path))
                ))  # fmt: skip
    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    generated = q.generate(prompt, max_new_tokens=4, do_sample=False)
    for h in hooks:
        h.remove()
    assert generated.shape == (1, 9)
    steps, current = [], None
    for ev in events:
        if ev[0] == "route":
            current = {"layer": ev[1], "routed": ev[2], "gate_up_projs": [], "down_projs": [], "paths": set()}
            steps.append(current)
        else:
            assert ev[1] == current["layer"]
            current[ev[2]].append(ev[3])
            current["paths"].add(ev[4])
    assert len(steps) == 2 * 4  # 2 layers x (prefill + 3 decode steps)
    for step in steps:  # each routed expert ran once (both matrices), no other expert ran
        assert sorted(step["gate_up_projs"]) == sorted(step["routed"]) == sorted(step["down_projs"])
        if cpu_kernel.extension() is not None:
            assert step["paths"] == {"cpu_fused"}
    assert all(len(s["routed"]) == TOP_K for s in steps[2:])  # one token per decode step: top-k experts only


# --- calibrated methods: attention with the method, experts with round-to-nearest -------------------------
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_quantize_experts_with_rtn(float_dirs, ids, tmp_path, caplog, method):
    path, fp = float_dirs["qwen3_moe"]
    cal = {"dataset": [kjv_text("calibration")[:6000]], "samples": 4, "sequence_length": 64, "batch_size": 2}
    with caplog.at_level(logging.WARNING, logger="hf_efficiency.quant.modules.experts"):
        q = _load(path, {**RTN4, "method": method}, calibration=cal)
    warnings = [r.getMessage() for r in caplog.records if "mixture-of-experts" in r.getMessage()]
    assert len(warnings) == 1 and f"'{method}'" in warnings[0] and "round-to-nearest" in warnings[0]
    assert q.config.quantization_config.quantization.method == method
    _assert_expert_reference(q, fp, QuantizationSpec(**RTN4))
    # attention went through the method: not what plain rounding of the float weight gives
    rtn = quantize_matrix(fp.model.layers[1].self_attn.q_proj.weight, QuantizationSpec(**RTN4), 4,
                          scale_dtype=torch.float16)  # fmt: skip
    assert not torch.equal(q.model.layers[1].self_attn.q_proj.weight, rtn.packed)
    assert _moe(q, 0).gate.weight.dtype == torch.float32
    text = make_byte_tokenizer()(kjv_text("evaluation")[:2000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():  # on text like the calibration data: measured 0.046 (gptq), 0.067 (awq; rtn: 0.067)
        assert _rel(q(text).logits, fp(text).logits) < 0.09
    out = tmp_path / "q"
    q.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)


# --- exports refuse; the memory estimate counts the packed experts ----------------------------------------
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq", "gguf"])
def test_export_refuses_quantized_experts(float_dirs, tmp_path, fmt):
    q = _load(float_dirs["mixtral"][0], {**RTN4, "symmetric": True})
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.experts holds quantized mixture-of-experts"):
        export_model(q, tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="exporting MoE experts"):
        q.save_pretrained(tmp_path / "y", export_format=fmt)


@pytest.mark.parametrize("kind", FAMILIES)
def test_memory_estimate_counts_quantized_experts(float_dirs, kind):
    path, _ = float_dirs[kind]
    q = _load(path, RTN4)
    real = weight_bytes(q)
    est = estimate_memory(AutoConfig.from_pretrained(path), "inference", efficiency_config={"quantization": RTN4})
    assert est.details["quantized_linears"] == real["quantized"]  # every packed expert and linear tensor
    float_est = estimate_memory(AutoConfig.from_pretrained(path), "inference")
    assert est.weights < 0.5 * float_est.weights
