"""Calibrated methods end to end on a tiny Llama: AWQ/GPTQ/HQQ, outliers, mixed precision, W8A8;
save/reload identity, and the errors users hit."""

import json

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import kjv_text
from hf_efficiency.families import family_of
from hf_efficiency.quant import QuantLinear
from hf_efficiency.quant.calibrated.capture import collect_layer_stats, find_decoder_layers
from hf_efficiency.quant.calibrated.pipeline import fold_group, scaling_groups
from hf_efficiency.quant.core.mixed import allocate_bits, bits_for_module, module_matches
from hf_efficiency.quant.core.outliers import outlier_scores, select_outliers
from hf_efficiency.quant.core.scheme import fake_quantize
from hf_efficiency.quant.methods.awq import awq_search_clip, awq_search_scale, smoothquant_scales

CAL_TEXT = kjv_text("calibration")[:12000]
EVAL = kjv_text("evaluation")[:3000]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    # 4 heads / 4 kv heads: every AWQ scaling group exists (v -> o too). Four salient input channels
    # (norm weights x20), like the activation outliers of real LLMs that AWQ and GPTQ exploit.
    model = make_tiny_llama(seed=5, tie=False, num_key_value_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[:4] *= 20
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eval_ids():
    return make_byte_tokenizer()(EVAL, return_tensors="pt").input_ids[:, :384]


def _cal(samples=6, length=256):
    return {"dataset": [CAL_TEXT], "samples": samples, "sequence_length": length, "batch_size": 3}


def _loss(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def _load(path, cfg):
    return AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)


# --- pure pieces ---------------------------------------------------------------------------
def test_awq_scale_search_never_worse_than_plain_rounding_and_finds_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30  # salient input channels
    w = torch.randn(64, 128, generator=g) * 0.05
    fq = lambda t: fake_quantize(t, 3, 32, False)  # noqa: E731
    s, alpha, losses = awq_search_scale(x, [w], [fq], x.abs().mean(0), grid=10)
    assert losses[0] == pytest.approx(((x @ w.t() - x @ fq(w).t()) ** 2).mean().item(), rel=1e-5)
    assert alpha > 0 and min(losses) < 0.8 * losses[0]
    assert s[:4].min() > s[4:].max()  # salient channels get the largest scales


def test_awq_clip_lowers_output_error_and_only_shrinks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 96, generator=g)
    w = torch.distributions.StudentT(2.0).sample((32, 96)) * 0.02
    fq = lambda t: fake_quantize(t, 3, 32, False)  # noqa: E731
    clamped = awq_search_clip(x, w, fq, 32, grid=20, max_shrink=0.5)
    assert (clamped.abs() <= w.abs() + 1e-7).all()
    err = lambda q: ((x @ w.t() - x @ q.t()) ** 2).mean().item()  # noqa: E731
    assert err(fq(clamped)) < err(fq(w))


def test_smoothquant_scales_formula():
    act = torch.tensor([4.0, 1.0, 9.0])
    w1, w2 = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])
    s = smoothquant_scales(act, [w1, w2], 0.5)
    assert torch.allclose(s, torch.tensor([2.0 / 2.0, 1.0 / 2.0**0.5, 3.0 / 0.5**0.5]))


def test_outlier_selection_takes_top_k_per_row_weighted_by_activation():
    w = torch.tensor([[0.1, -3.0, 0.2, 0.3], [1.0, 0.1, -0.1, 0.2]])
    mask, index = select_outliers(outlier_scores(w), 1)
    assert index.tolist() == [[1], [0]] and mask.sum().item() == 2
    _, index = select_outliers(outlier_scores(w, torch.tensor([0.01, 0.01, 1.0, 1.0])), 1)
    assert index.tolist() == [[3], [3]]
    with pytest.raises(ValueError, match=r"outliers per row must be in \[1, 4\], got 5"):
        select_outliers(w, 5)


def test_bits_for_module_patterns_and_allocation_meets_target():
    from hf_efficiency.config import QuantizationSpec

    spec = QuantizationSpec(bits=4, module_bits={"down_proj": 8, r"model\.layers\.1\..*": 2})
    assert bits_for_module("model.layers.0.mlp.down_proj", spec) == 8
    assert bits_for_module("model.layers.1.self_attn.q_proj", spec) == 2
    assert bits_for_module("model.layers.0.self_attn.q_proj", spec) == 4
    assert module_matches("a.b.c", "b.c") and not module_matches("a.xb.c", "b.c")
    sizes = {"a": 100, "b": 100, "c": 200}
    errors = {"a": {2: 100.0, 4: 10.0, 8: 1.0}, "b": {2: 5.0, 4: 1.0, 8: 0.1}, "c": {2: 50.0, 4: 5.0, 8: 0.5}}
    # budget 3.0 * 400 = 1200 bit-weights: a 2->4 (gain 0.45/bit) first, then c 2->4 (0.11/bit) does
    # not fit (1400), b 2->4 (0.02/bit) does (1200)
    assert allocate_bits(sizes, errors, [2, 4, 8], 3.0) == {"a": 4, "b": 4, "c": 2}
    assert allocate_bits(sizes, errors, [2, 4, 8], 4.0) == {"a": 4, "b": 4, "c": 4}
    assert allocate_bits(sizes, errors, [2, 4, 8], 6.0) == {"a": 8, "b": 8, "c": 4}  # c 4->8 would not fit
    assert allocate_bits(sizes, errors, [2, 4, 8], 2.0) == {"a": 2, "b": 2, "c": 2}


def test_fold_scales_keeps_the_float_layer_equivalent(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        _, layers = find_decoder_layers(model)
        family = family_of(model)
        for layer in layers:
            groups = scaling_groups(layer, family, model.config)
            assert len(groups) == 4  # q/k/v, o (no shared kv heads), gate/up, down
            for group, consumers in groups:
                s = torch.rand(layer.get_submodule(consumers[0]).in_features) * 4 + 0.25
                fold_group(layer, group, family, s)
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_stats_are_shared_by_linears_reading_the_same_tensor(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    from hf_efficiency.quant.calibrated.capture import capture_first_layer_inputs

    _, layers = find_decoder_layers(model)
    batches = capture_first_layer_inputs(model, layers, torch.randint(0, 256, (4, 16)), 2)
    names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    stats, outs = collect_layer_stats(layers[0], batches, names, want_xtx=True)
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"] and stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    st = stats["self_attn.q_proj"]
    assert st.tokens == 64 and torch.allclose(st.hessian.diagonal(), st.mean_sq, rtol=1e-5)
    assert len(outs) == 2 and outs[0].shape == (2, 16, 64)


# --- end to end ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "quant",
    [
        {"method": "awq", "bits": 3, "group_size": 32},
        {"method": "gptq", "bits": 3, "group_size": 32, "symmetric": True},
        {"method": "gptq", "bits": 4, "group_size": None, "gptq_act_order": True, "outliers": 0.05},
        {"method": "hqq", "bits": 2, "group_size": 32, "outliers": 0.05},
        {"method": "rtn", "bits": 4, "group_size": 64, "target_bits": 3.0, "bits_choices": [2, 4]},
        {"method": "hqq", "bits": 3, "group_size": 64},
    ],
    ids=["awq", "gptq-sym", "gptq-actorder-outliers", "hqq-outliers-calibrated", "rtn-auto-mixed", "hqq-on-load"],
)
def test_calibrated_method_saves_and_reloads_identically(tiny_dir, tmp_path, eval_ids, quant):
    cfg = EfficiencyConfig(quantization=quant, calibration=_cal())
    q = _load(tiny_dir, cfg)
    mods = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 14 and type(q.lm_head).__name__ == "Linear"
    applied = q.config.quantization_config
    assert applied.quantization.method == quant["method"] and applied.calibration.samples == 6
    if quant.get("outliers"):
        assert {(m.in_features, m.outliers) for m in mods.values()} == {(64, 4), (128, 7)}  # ceil(0.05 * in)
        assert all(m.weight_outlier_index.dtype == torch.int16 for m in mods.values())
    if quant.get("target_bits"):
        widths = [m.bits for m in mods.values()]
        sizes = [m.in_features * m.out_features for m in mods.values()]
        assert set(widths) == {2, 4} and sum(b * s for b, s in zip(widths, sizes)) <= 3.0 * sum(sizes)
        assert applied.quantization.module_bits and all(b == 2 for b in applied.quantization.module_bits.values())
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quantization"]["method"] == quant["method"] and saved["calibration"]["sequence_length"] == 256
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(again(eval_ids).logits, q(eval_ids).logits)
    assert [m.bits for m in again.modules() if isinstance(m, QuantLinear)] == [m.bits for m in mods.values()]


def test_awq_and_gptq_beat_round_to_nearest_on_the_tiny_model(tiny_dir, eval_ids):
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(tiny_dir)(eval_ids).logits
        base = {"bits": 3, "group_size": 64}
        err = {}
        for method in ("rtn", "awq", "gptq"):
            q = _load(tiny_dir, {"quantization": {**base, "method": method}, "calibration": _cal()})
            err[method] = (q(eval_ids).logits - fp).pow(2).mean().item()
    # measured logits MSE: rtn 0.0068, awq 0.0018, gptq 0.0011
    assert err["gptq"] < 0.8 * err["rtn"] and err["awq"] < 0.8 * err["rtn"], err


def test_outliers_lower_the_error_and_are_counted_in_the_bytes(tiny_dir, eval_ids):
    from hf_efficiency.evaluate import weight_bytes

    fp = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base = {"method": "rtn", "bits": 2, "group_size": 64}
    plain = _load(tiny_dir, {"quantization": base})
    kept = _load(tiny_dir, {"quantization": {**base, "outliers": 0.05}})
    wp = dict(plain.named_modules())["model.layers.0.mlp.down_proj"]
    wk = dict(kept.named_modules())["model.layers.0.mlp.down_proj"]
    ref = dict(fp.named_modules())["model.layers.0.mlp.down_proj"].weight
    assert (wk.dequantize_weight() - ref).pow(2).sum() < (wp.dequantize_weight() - ref).pow(2).sum()
    # the kept weights are exact (float16) at their positions
    idx = wk.weight_outlier_index.long()
    assert torch.equal(wk.dequantize_weight().gather(1, idx), ref.gather(1, idx).half().float())
    extra = sum(
        m.weight_outlier_index.numel() * 2 + m.weight_outlier_value.numel() * 2
        for m in kept.modules()
        if isinstance(m, QuantLinear)
    )
    assert weight_bytes(kept)["total"] - weight_bytes(plain)["total"] == extra
    with torch.no_grad():
        ref_logits = fp(eval_ids).logits
        err_kept = (kept(eval_ids).logits - ref_logits).pow(2).mean().item()
        err_plain = (plain(eval_ids).logits - ref_logits).pow(2).mean().item()
    assert err_kept < 0.8 * err_plain  # measured 0.011 vs 0.022


def test_explicit_module_bits_build_matching_shells_on_reload(tiny_dir, tmp_path, eval_ids):
    cfg = {"quantization": {"bits": 4, "group_size": 32, "module_bits": {"down_proj": 8, "q_proj": 2}}}
    q = _load(tiny_dir, cfg)
    bits = {n: m.bits for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert bits["model.layers.1.mlp.down_proj"] == 8 and bits["model.layers.0.self_attn.q_proj"] == 2
    assert bits["model.layers.0.self_attn.k_proj"] == 4
    q.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again(eval_ids).logits, q(eval_ids).logits)


# --- errors ----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny_dir):
    with pytest.raises(ValueError, match=r"calibration.dataset is empty"):
        EfficiencyConfig(quantization={"method": "awq"}, calibration={"dataset": ["", "  "]})
    with pytest.raises(ValueError, match=r"calibration data is too short"):
        _load(
            tiny_dir, {"quantization": {"method": "gptq"}, "calibration": {"dataset": ["tiny"], "sequence_length": 64}}
        )
    with pytest.raises(ValueError, match=r"quantization.symmetric=True is not allowed; allowed values: False \(hqq"):
        EfficiencyConfig(quantization={"method": "hqq", "symmetric": True})
    with pytest.raises(ValueError, match=r"quantization.bits=5 is not allowed"):
        EfficiencyConfig(quantization={"method": "gptq", "bits": 5})
    with pytest.raises(
        ValueError, match=r"quantization.outliers=0.5 is not allowed; allowed values: a fraction in \[0, 0.1\]"
    ):
        EfficiencyConfig(quantization={"outliers": 0.5})
    with pytest.raises(ValueError, match=r"quantization.target_bits=9 is not allowed"):
        EfficiencyConfig(quantization={"target_bits": 9})
    with pytest.raises(ValueError, match=r"activations \(W8A8\) needs quantization="):
        EfficiencyConfig(quantization={"bits": 4}, activations={"mode": "dynamic"})
    with pytest.raises(ValueError, match=r"calibration.samples=0 is not allowed"):
        EfficiencyConfig(quantization={"method": "awq"}, calibration={"samples": 0})


def test_calibrated_methods_get_an_explicit_default_calibration_section():
    cfg = EfficiencyConfig(quantization={"method": "gptq"})
    assert cfg.to_dict()["calibration"] == {
        "dataset": "kjv",
        "samples": 32,
        "sequence_length": 512,
        "batch_size": 4,
        "tokenizer": None,
        "device": None,
    }
    assert EfficiencyConfig(quantization={"method": "hqq"}).calibration is None


# --- W8A8 --------------------------------------------------------------------------------------
def _w8a8(act):
    return {
        "quantization": {"bits": 8, "group_size": None, "symmetric": True},
        "activations": act,
        "calibration": _cal(),
    }


def test_w8a8_modes_run_int8_matmuls_and_reload_identically(tiny_dir, tmp_path, eval_ids):
    from hf_efficiency.quant.core.activation import int8_linear_reference, quantize_per_token

    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(tiny_dir)(eval_ids).logits
        err = {}
        for name, act in {
            "dynamic": {"mode": "dynamic"},
            "static": {"mode": "static", "percentile": 99.9},
            "smooth": {"mode": "dynamic", "smoothquant": 0.5},
        }.items():
            q = _load(tiny_dir, _w8a8(act))
            lin = q.model.layers[0].mlp.down_proj
            assert lin.act_mode == act["mode"]
            assert (lin.input_scale is not None) == (act["mode"] == "static")
            out = q(eval_ids).logits
            assert lin.last_path == "w8a8"
            err[name] = (out - fp).pow(2).mean().item()
            q.save_pretrained(tmp_path / name)
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / name)(eval_ids).logits, out)
        # the module computes exactly the int32 reference
        x = torch.randn(5, lin.in_features)
        q_x, s_x = quantize_per_token(x)
        dyn = _load(tiny_dir, _w8a8({"mode": "dynamic"})).model.layers[0].mlp.down_proj
        from hf_efficiency.quant.kernels.dispatch import int8_kernel_layout

        q_w, s_w = int8_kernel_layout(dyn, torch.float32)
        assert torch.equal(dyn(x), int8_linear_reference(q_x, s_x, q_w, s_w))
    # measured logits MSE: smooth 1.0e-5 < dynamic 4.5e-5 < static 1.3e-3
    # SmoothQuant moves the salient channels' range into the weights: lower error than plain dynamic
    assert err["smooth"] < err["dynamic"] < err["static"], err


def test_w8a8_dynamic_needs_no_calibration_and_static_gets_one(tiny_dir):
    from hf_efficiency import EfficiencyConfig

    dyn = EfficiencyConfig(
        quantization={"bits": 8, "group_size": None, "symmetric": True}, activations={"mode": "dynamic"}
    )
    assert dyn.calibration is None and not dyn.needs_calibration
    static = EfficiencyConfig(
        quantization={"bits": 8, "group_size": None, "symmetric": True}, activations={"mode": "static"}
    )
    assert static.calibration is not None and static.needs_calibration
    q = _load(tiny_dir, dyn)  # quantized per tensor while loading
    assert q.model.layers[1].self_attn.v_proj.act_mode == "dynamic"


def test_w8a8_path_override_gives_the_same_numbers_and_bad_names_fail(tiny_dir, eval_ids, monkeypatch):
    from hf_efficiency.quant.core.activation import onednn_available

    q = _load(tiny_dir, _w8a8({"mode": "dynamic"}))
    x = torch.randn(3, 7, 64)
    lin = q.model.layers[0].self_attn.q_proj
    ref = lin(x)
    monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "dequant")  # weight-only override never applies to W8A8
    assert torch.equal(lin(x), ref) and lin.last_path == "w8a8"
    monkeypatch.setenv("HF_EFFICIENCY_W8A8_PATH", "dequant")
    assert torch.allclose(lin(x), ref, rtol=1e-5, atol=1e-6)
    if onednn_available():
        monkeypatch.setenv("HF_EFFICIENCY_W8A8_PATH", "onednn")
        assert torch.equal(lin(x), ref)
    monkeypatch.setenv("HF_EFFICIENCY_W8A8_PATH", "fbgemm")
    with pytest.raises(
        ValueError, match=r"HF_EFFICIENCY_W8A8_PATH='fbgemm' is not allowed; allowed values: int_mm, onednn, dequant"
    ):
        lin(x)


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"quantization": {"module_bits": {"down_proj": 5}}},
            r"quantization.module_bits=\{'down_proj': 5\} is not allowed; allowed values: None or a dict",
        ),
        (
            {"quantization": {"bits_choices": []}},
            r"quantization.bits_choices=\[\] is not allowed; allowed values: a non-empty list of ints among 8, 4, 3, 2",
        ),
        (
            {"quantization": {"awq_grid": 1}},
            r"quantization.awq_grid=1 is not allowed; allowed values: an integer in \[2, 100\]",
        ),
        (
            {"quantization": {"gptq_damp": 0}},
            r"quantization.gptq_damp=0 is not allowed; allowed values: a float in \(0, 1\)",
        ),
        (
            {"quantization": {"hqq_optimize_scale": "yes"}},
            r"quantization.hqq_optimize_scale='yes' is not allowed; allowed values: True, False",
        ),
        (
            {"quantization": {"bits": 8, "group_size": None, "symmetric": True}, "activations": {"mode": "per-tensor"}},
            r"activations.mode='per-tensor' is not allowed; allowed values: dynamic, static",
        ),
        (
            {"quantization": {"bits": 8, "group_size": None, "symmetric": True}, "activations": {"percentile": 40}},
            r"activations.percentile=40 is not allowed; allowed values: a number in \(50, 100\]",
        ),
        (
            {"quantization": {"bits": 8, "group_size": None, "symmetric": True}, "activations": {"smoothquant": 1.5}},
            r"activations.smoothquant=1.5 is not allowed; allowed values: None or a float in \(0, 1\)",
        ),
        (
            {"quantization": {"bits": 8, "group_size": None, "symmetric": True, "method": "awq"}, "activations": {}},
            r"activations \(W8A8\) supports quantization.method 'rtn' or 'gptq'",
        ),
        ({"quantization": {"method": "awq"}, "calibration": {"dataset": 7}}, r"calibration.dataset=7 is not allowed"),
    ],
)
def test_new_config_keys_reject_bad_values_with_the_allowed_ones(sections, message):
    with pytest.raises(ValueError, match=message):
        EfficiencyConfig(**sections)


class _BosTokenizer:
    """Bytes as ids, BOS (300) first when special tokens are added: as Gemma's tokenizer encodes text."""

    bos_token_id = 300

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = list(text.encode())
        return {"input_ids": ([300] if add_special_tokens else []) + ids}


def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_it():
    from hf_efficiency.config import CalibrationSpec
    from hf_efficiency.quant.calibrated.capture import adds_bos, calibration_windows

    spec = CalibrationSpec(dataset=[CAL_TEXT], samples=3, sequence_length=16)
    windows = calibration_windows(spec, _BosTokenizer())
    text = list(CAL_TEXT.encode())
    assert adds_bos(_BosTokenizer()) and windows.shape == (3, 16)
    assert windows[:, 0].tolist() == [300] * 3
    assert windows[:, 1:].reshape(-1).tolist() == text[: 3 * 15]  # 15 text tokens per window, in order
    plain = calibration_windows(spec, make_byte_tokenizer())  # no BOS: windows of 16 text tokens
    assert not adds_bos(make_byte_tokenizer()) and plain.reshape(-1).tolist() == text[: 3 * 16]
