"""The bundled real model (SmolLM2-135M-Instruct) end to end. Marked slow; CI runs them."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 2048  # 4 windows of 512 tokens of the fixed KJV evaluation slice


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficiency.data import load_text, token_windows
    from hf_efficiency.demo import bundled_model_path

    path = str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, load_text("kjv", "evaluation"), 512, TOKENS)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from hf_efficiency.evaluate import perplexity

    return path, windows, perplexity(fp, windows, progress=False)["perplexity"]


def _ppl(path, windows, **kwargs):
    from transformers import AutoModelForCausalLM

    from hf_efficiency.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return model, perplexity(model, windows, progress=False)["perplexity"]


def test_cli_int8_within_half_percent_and_fresh_process_reload_is_identical(bundled, tmp_path):
    from hf_efficiency.cli import main

    path, windows, fp_ppl = bundled
    out = tmp_path / "smollm2-int8"
    assert (
        main(["quantize", "--bits", "8", "--group-size", "none", "--symmetric", "--clip", "none", "--out", str(out)])
        == 0
    )
    model, ppl = _ppl(str(out), windows)
    assert abs(ppl / fp_ppl - 1) < 0.005, (ppl, fp_ppl)
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["base_model"]
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    ids = windows[:1, :64]
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / "ref.pt")!r})
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
print("IDENTICAL" if torch.equal(m(ref["ids"]).logits, ref["logits"]) else "DIFFERENT")
"""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", "import hf_efficiency\n" + code], capture_output=True, text=True, env=env)
    assert r.stdout.strip().endswith("IDENTICAL"), r.stderr[-3000:]


def test_weight_mse_clipping_lowers_weight_error_but_not_perplexity(bundled):
    # Measured finding, kept as a guard: on this model the calibration-free weight-MSE clip search
    # reduces the weights' squared error yet raises perplexity at 4 bits (it clips the large weights).
    # If this ever flips, the README's "Clipping" section and the default clip must be revisited.
    from transformers import AutoModelForCausalLM

    path, windows, fp_ppl = bundled
    spec = {"bits": 4, "group_size": 128, "symmetric": False}
    clipped_model, clipped = _ppl(path, windows, efficiency_config={"quantization": {**spec, "clip": "mse"}})
    plain_model, plain = _ppl(path, windows, efficiency_config={"quantization": {**spec, "clip": "none"}})
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    w = fp.model.layers[3].mlp.down_proj.weight
    err = lambda m: ((m.model.layers[3].mlp.down_proj.dequantize_weight() - w) ** 2).sum().item()  # noqa: E731
    assert err(clipped_model) < 0.95 * err(plain_model)
    assert fp_ppl < plain < clipped, (fp_ppl, plain, clipped)
    assert plain < 2.1 * fp_ppl  # measured 1.91x on these 4 windows: a regression guard


def test_group_32_is_nearly_lossless_on_a_q4_1_source(bundled):
    # The bundled weights are de-quantized Q4_1 (4-bit, blocks of 32, scale + min): asymmetric
    # 4-bit groups of 32 land on the same grid, up to fp16 rounding of scale and minimum.
    path, windows, fp_ppl = bundled
    _, ppl = _ppl(path, windows, efficiency_config={"quantization": {"bits": 4, "group_size": 32, "clip": "none"}})
    assert abs(ppl / fp_ppl - 1) < 0.005, (ppl, fp_ppl)


def test_calibrated_methods_beat_round_to_nearest_at_4_bits_and_hqq_at_3_bits(bundled, tmp_path):
    """The issue's ordering on the real model, with a smaller calibration set to fit CI
    (benchmarks/quantization.py has the full-size numbers)."""
    path, windows, fp_ppl = bundled
    # 16 windows: AWQ on this model needs them (8 windows: 23.4, 16: 15.8, 32: 14.8 on these 4 eval
    # windows; RTN with clipping 22.7)
    cal = {"dataset": "kjv", "samples": 16, "sequence_length": 512}
    ppl = {}
    for name, quant in {
        "rtn-clip": {"method": "rtn", "bits": 4, "group_size": 128, "clip": "mse"},
        "awq": {"method": "awq", "bits": 4, "group_size": 128},
        "gptq": {"method": "gptq", "bits": 4, "group_size": 128},
        "rtn-3": {"method": "rtn", "bits": 3, "group_size": 64},
        "hqq-3": {"method": "hqq", "bits": 3, "group_size": 64},
    }.items():
        cfg = {"quantization": quant}
        if quant["method"] in ("awq", "gptq"):
            cfg["calibration"] = cal
        model, ppl[name] = _ppl(path, windows, efficiency_config=cfg)
        if name == "gptq":
            model.save_pretrained(tmp_path / "gptq")
            again, again_ppl = _ppl(str(tmp_path / "gptq"), windows)
            assert again_ppl == ppl["gptq"]
    assert ppl["awq"] < ppl["rtn-clip"] and ppl["gptq"] < ppl["rtn-clip"], ppl
    assert torch.isfinite(torch.tensor(ppl["hqq-3"])) and ppl["hqq-3"] < ppl["rtn-3"], ppl


def test_w8a8_dynamic_close_to_fp32_and_smoothquant_closer(bundled):
    path, windows, fp_ppl = bundled
    w8 = {"bits": 8, "group_size": None, "symmetric": True}
    model, plain = _ppl(path, windows, efficiency_config={"quantization": w8, "activations": {"mode": "dynamic"}})
    assert model.model.layers[0].mlp.down_proj.act_mode == "dynamic"
    _, smooth = _ppl(
        path,
        windows,
        efficiency_config={
            "quantization": w8,
            "activations": {"mode": "dynamic", "smoothquant": 0.5},
            "calibration": {"dataset": "kjv", "samples": 8, "sequence_length": 512},
        },
    )
    # full evaluation slice (benchmarks/results/quantization.md): plain +4.3%, SmoothQuant 0.5 +1.7%
    assert abs(smooth / fp_ppl - 1) < abs(plain / fp_ppl - 1) < 0.06, (smooth, plain, fp_ppl)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="inference", batch_size=1, sequence_length=512),
        dict(
            mode="inference",
            batch_size=1,
            sequence_length=512,
            efficiency_config={"quantization": {"bits": 4, "group_size": 128}},
        ),
        dict(mode="training", batch_size=2, sequence_length=256),
        dict(mode="training", batch_size=2, sequence_length=256, training="lora"),
    ],
    ids=["fp32-inference", "int4-inference", "full-finetuning", "lora"],
)
def test_memory_estimate_within_15_percent_on_smollm2(kwargs):
    """The issue's acceptance scenarios: estimate (from config.json only) vs the measured CPU peak."""
    from hf_efficiency.demo import bundled_model_path
    from hf_efficiency.memory import estimate_memory, measure_memory

    path = str(bundled_model_path())
    est = estimate_memory(path, device="cpu", **kwargs)
    measured = measure_memory(path, device="cpu", isolate=True, **kwargs)
    assert est.total_without_overhead == pytest.approx(measured.peak_bytes, rel=0.15)


def test_distillation_on_real_model_recovers_a_pruned_student_faster_than_labels(bundled, tmp_path):
    """A 10-of-30-layer SmolLM2 student: 8 steps of forward-KL distillation (alpha 0.5) reach a lower
    held-out perplexity than 8 steps of label-only training from the same start; the teacher is untouched."""
    from transformers import AutoModelForCausalLM, default_data_collator

    from hf_efficiency.distill import DistillationTrainer, DistillationTrainingArguments, make_student
    from hf_efficiency.evaluate import perplexity

    path, windows, _ = bundled
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t_before = teacher.model.layers[5].mlp.down_proj.weight.clone()
    rows = windows[:2].reshape(-1, 64)  # 16 rows; held-out text is windows 2-3
    train = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]
    held_out = windows[2:, :256]
    ppl = {}
    for name, alpha in (("labels", 0.0), ("kd", 0.5)):
        student = make_student(teacher, 10)
        if name == "labels":
            ppl["init"] = perplexity(student, held_out, progress=False)["perplexity"]
        args = DistillationTrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=4,
            max_steps=8,
            learning_rate=1e-3,
            warmup_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            alpha=alpha,
        )
        DistillationTrainer(
            model=student, args=args, train_dataset=train, data_collator=default_data_collator, teacher_model=teacher
        ).train()
        ppl[name] = perplexity(student, held_out, progress=False)["perplexity"]
    assert torch.equal(teacher.model.layers[5].mlp.down_proj.weight, t_before)
    assert ppl["labels"] < ppl["init"] / 100, ppl
    assert ppl["kd"] < ppl["labels"], ppl


def test_speculative_greedy_identity_on_smollm2_every_draft_kind(bundled):
    """Greedy identity on the real model, batch 1 and a left-padded batch of 3, for each draft kind
    (benchmarks/speculative.py runs the 20-prompt version with timings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficiency.demo import KJV_SPLITS, kjv_passages
    from hf_efficiency.speculative import left_pad

    path, _, _ = bundled
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lo, _ = KJV_SPLITS["evaluation"]
    prompts = [tok(p, return_tensors="pt").input_ids[0, :n] for p, n in zip(kjv_passages()[lo : lo + 3], (20, 28, 36))]
    greedy = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
    refs = [model.generate(p[None], **greedy)[0, p.numel() :] for p in prompts]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]
    for draft in ("int4", "bfloat16", "early-exit:20", "ngram"):
        for p, ref in zip(prompts, refs):
            out = model.generate(p[None], draft_model=draft, **greedy)
            assert torch.equal(out[0, p.numel() :], ref), draft
        out = model.generate(ids, attention_mask=mask, draft_model=draft, return_dict_in_generate=True, **greedy)
        for r in range(3):
            assert torch.equal(out.sequences[r, width:], refs[r]), (draft, r)
        if draft == "bfloat16":  # benchmarks/speculative.py: 97 % acceptance, 0.13 passes per token
            assert out.speculative_stats.target_passes_per_token <= 0.6


def _left_padded_pair(windows, pad_id, length=96, pad=17):
    ids = windows[:2, :length].clone()
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = pad_id, 0
    return ids, mask


def test_blockwise_path_matches_eager_on_padded_gqa_batch_cached_decoding_and_generate(bundled, monkeypatch):
    """SmolLM2 has grouped-query attention (9 query heads, 3 key/value heads). The block-wise path is
    forced; its logits agree with eager's as closely as sdpa's do (float32 summation order over 30
    layers), and greedy generation is token-identical to sdpa's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    path, windows, _ = bundled
    pad_id = AutoTokenizer.from_pretrained(path).pad_token_id
    monkeypatch.setenv("HF_EFFICIENCY_ATTENTION_PATH", "blockwise")
    models = {
        impl: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa", "hf_efficiency_blockwise")
    }
    ids, mask = _left_padded_pair(windows, pad_id)
    logits, cached = {}, {}
    with torch.no_grad():
        for impl, model in models.items():
            logits[impl] = model(ids, attention_mask=mask).logits
            cache = DynamicCache()  # prefill 80 tokens, then 16 single-token steps through the cache
            model(ids[:, :80], attention_mask=mask[:, :80], cache=cache)
            steps = [
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(80, 96)
            ]
            cached[impl] = torch.cat(steps, dim=1)
    valid = mask.bool()
    scale = float(logits["eager"][valid].abs().max())
    for outputs in (logits, cached):
        view = (lambda t: t[valid]) if outputs is logits else (lambda t: t)
        block = float((view(outputs["hf_efficiency_blockwise"]) - view(outputs["eager"])).abs().max())
        sdpa = float((view(outputs["sdpa"]) - view(outputs["eager"])).abs().max())
        assert block <= 1e-5 * scale, (block, scale)  # relative to the logit scale (about 20)
        assert block <= 2 * sdpa + 1e-6, (block, sdpa)
    assert torch.allclose(cached["hf_efficiency_blockwise"], logits["eager"][:, 80:96], atol=1e-5 * scale, rtol=0)
    greedy = {"attention_mask": mask, "max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}
    out = models["hf_efficiency_blockwise"].generate(ids, **greedy)
    assert torch.equal(out, models["sdpa"].generate(ids, **greedy))


def test_int8_kv_cache_within_1_percent_at_2k_context_and_lowrank_error_falls_with_rank(bundled):
    """int8 cache at 2k context (chunks of 256 through the cache): perplexity within 1 % of the float
    cache and about a quarter of its bytes; low-rank attention is exact when its window covers the
    sequence and its error falls as landmarks and window grow."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    from hf_efficiency.attention import QuantizedKVCache, cache_nbytes
    from hf_efficiency.data import load_text, token_windows

    path, windows, fp_ppl = bundled
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    window = token_windows(AutoTokenizer.from_pretrained(path), load_text("kjv", "evaluation"), 2048, 2048)[0]
    ppl, nbytes = {}, {}
    for name, cache in (("float", DynamicCache()), ("int8", QuantizedKVCache(8, 64))):
        nll = 0.0
        with torch.no_grad():
            for s in range(0, 2048, 256):
                logits = model(window[None, s : s + 256], cache=cache).logits[0]
                target = window[s + 1 : s + 257]
                nll += float(torch.nn.functional.cross_entropy(logits[: target.numel()], target, reduction="sum"))
        ppl[name] = math.exp(nll / 2047)
        nbytes[name] = cache_nbytes(cache)
    assert abs(ppl["int8"] / ppl["float"] - 1) < 0.01, ppl
    assert 0.25 < nbytes["int8"] / nbytes["float"] < 0.28, nbytes  # 1 byte + 4 bytes of scales per 64 values

    lowrank = {}
    for landmarks, win in ((16, 64), (64, 256), (128, 512)):
        _, lowrank[win] = _ppl(
            path,
            windows,
            attn_implementation="hf_efficiency_lowrank",
            efficiency_config={"attention": {"lowrank_landmarks": landmarks, "lowrank_window": win}},
        )
    assert abs(lowrank[512] / fp_ppl - 1) < 1e-4, (lowrank, fp_ppl)  # windows of 512 tokens: exact
    assert lowrank[64] > lowrank[256] > fp_ppl, (lowrank, fp_ppl)


def test_bundled_gguf_keeps_its_bits_matches_transformers_and_converts_round_trip(bundled, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficiency.cli import main
    from hf_efficiency.demo import bundled_gguf_path
    from hf_efficiency.formats import load_gguf
    from hf_efficiency.quant.modules.linear import QuantLinear

    path, windows, _ = bundled
    ids = windows[:2, :128]
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # transformers' de-quantized load
    model = load_gguf(bundled_gguf_path()).eval()
    with torch.no_grad():
        ref, ours = fp(ids).logits, model(ids).logits
    assert torch.equal(ours, ref)  # Q4_1 codes, float16 scales and minima: the same float weights, bit for bit
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * 30 and {(m.bits, m.group_size, m.symmetric) for m in layers} == {(4, 32, False)}
    stored = sum(sum(t.numel() * t.element_size() for t in (m.weight, m.weight_scale, m.weight_min)) for m in layers)
    params = sum(m.in_features * m.out_features for m in layers)
    assert 8 * stored / params == 5.0  # the file's own bits per weight: 5 / 16 of float16
    out = tmp_path / "converted"
    assert main(["convert", "--out", str(out)]) == 0
    again = AutoModelForCausalLM.from_pretrained(out).eval()  # plain from_pretrained of our format
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)
    text = "In the beginning God created the heaven and the earth."
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    )


def test_fused_cpu_kernel_matches_the_reference_path_on_smollm2(bundled, monkeypatch):
    """int4 g128 and int8 SmolLM2: prefill bit-identical to the reference path, decode steps within float
    rounding, and 24 greedy tokens identical."""
    from transformers import AutoModelForCausalLM

    from hf_efficiency import EfficiencyConfig

    path, windows, _ = bundled
    prompt = windows[:1, :24]
    for spec in ({"bits": 4, "group_size": 128}, {"bits": 8, "group_size": None, "symmetric": True}):
        model = AutoModelForCausalLM.from_pretrained(path, efficiency_config=EfficiencyConfig(quantization=spec)).eval()
        with torch.no_grad():
            fused_prefill = model(prompt).logits  # 24 rows: kernel de-quantization + float GEMM
            fused_step = model(prompt[:, :1]).logits  # 1 row: the fused matrix-vector kernel
        fused_tokens = model.generate(prompt, max_new_tokens=24, do_sample=False)
        assert model.model.layers[0].mlp.down_proj.last_path == "cpu_fused"
        monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "dequant")
        with torch.no_grad():
            assert torch.equal(model(prompt).logits, fused_prefill)
            ref_step = model(prompt[:, :1]).logits
        assert (fused_step - ref_step).abs().max() <= 1e-4 * ref_step.abs().max()
        assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), fused_tokens)
        monkeypatch.delenv("HF_EFFICIENCY_KERNEL")


def test_quantized_head_and_compiled_decode_on_smollm2(bundled, monkeypatch):
    """int4 g128 with the tied head untied and quantized to int8: perplexity within 0.5% of the float head's, 32
    greedy tokens of the compiled decode step equal to eager fused decoding's and to the reference path's."""
    from transformers import AutoModelForCausalLM

    from hf_efficiency import EfficiencyConfig, QuantLinear, compiled_generate_kwargs
    from hf_efficiency.evaluate import perplexity

    path, windows, _ = bundled
    spec = {"bits": 4, "group_size": 128}
    _, float_head = _ppl(path, windows, efficiency_config=EfficiencyConfig(quantization=spec))
    head8 = {**spec, "modules_to_not_convert": [], "module_bits": {"lm_head": 8}}
    model = AutoModelForCausalLM.from_pretrained(path, efficiency_config=EfficiencyConfig(quantization=head8)).eval()
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8 and not model.config.tie_word_embeddings
    assert perplexity(model, windows, progress=False)["perplexity"] <= float_head * 1.005
    prompt = windows[:1, :24]
    greedy = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    eager = model.generate(prompt, **greedy)
    assert model.lm_head.last_path == "cpu_fused"
    torch._dynamo.reset()
    assert torch.equal(model.generate(prompt, **greedy, **compiled_generate_kwargs()), eager)
    monkeypatch.setenv("HF_EFFICIENCY_KERNEL", "dequant")
    assert torch.equal(model.generate(prompt, **greedy), eager)
