"""GGUF export: block encoders against gguf's own quantizer and our reader's decoders, tiny Llama / Qwen2 /
Gemma 3 models (every ggml type we write) read back by our reader (bit-identical logits) and by
transformers' de-quantizing GGUF loader, refusals and lossy reports, the bundled SmolLM2 file written back
byte for byte (``slow``) and llama.cpp running what we write (``engines``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

import hf_efficiency  # noqa: F401  (registration)
from hf_efficiency.export import ExportError, export_model
from hf_efficiency.export.gguf import gguf_tensor_bytes
from hf_efficiency.export.gguf_blocks import (
    BLOCK_TYPES,
    encode_blocks,
    exact_float_encoding,
    q8_0_exact,
)
from hf_efficiency.export.gguf_metadata import llama_rope_rows
from hf_efficiency.formats import load_gguf
from hf_efficiency.formats.gguf_blocks import BLOCK_FORMATS, decode_blocks
from hf_efficiency.quant.core.scheme import quantize_weight
from hf_efficiency.quant.modules.linear import QuantLinear
from hf_efficiency.quant.modules.replace import set_submodule

LLAMA_PYTHON = Path.home() / ".cache" / "hf-efficiency" / "engines" / "llama" / "bin" / "python"


# --- block encoders ------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_encoder_inverts_the_reader_and_matches_ggufs_quantizer(type_name):
    fmt = BLOCK_FORMATS[type_name]
    rng = np.random.default_rng(fmt.block_bytes)
    x = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    ref = quantize(x, T[type_name])  # ggml's own rounding and layout
    codes, scale, minimum = decode_blocks(torch.from_numpy(ref.copy()), fmt, 256)
    ours = encode_blocks(type_name, codes, scale, minimum)
    assert ours.dtype == torch.uint8 and np.array_equal(ours.numpy(), ref)
    # random codes (every pattern) survive encode -> decode
    bits = fmt.bits
    codes = torch.from_numpy(rng.integers(0, 2**bits, (6, 256), dtype=np.uint8))
    codes[0, :2] = torch.tensor([0, 2**bits - 1], dtype=torch.uint8)
    scale = torch.from_numpy((rng.standard_normal((6, 8)) * 0.01).astype(np.float16)).float()
    minimum = (
        None if fmt.symmetric else torch.from_numpy((rng.standard_normal((6, 8)) * 0.1).astype(np.float16)).float()
    )
    raw = encode_blocks(type_name, codes, scale, minimum)
    c2, s2, m2 = decode_blocks(raw, fmt, 256)
    assert torch.equal(c2, codes) and torch.equal(s2, scale)
    assert (m2 is None and minimum is None) or torch.equal(m2, minimum)


def test_encoder_rejects_bad_input():
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="Q4_1 needs a minimum"):
        encode_blocks("Q4_1", codes, torch.ones(2, 2))
    with pytest.raises(ValueError, match="exact in float16"):
        encode_blocks("Q4_0", codes, torch.full((2, 2), 0.1))
    with pytest.raises(ValueError, match="holds 4-bit codes"):
        encode_blocks("Q4_0", codes + 16, torch.ones(2, 2))
    with pytest.raises(ValueError, match="whole number of blocks"):
        encode_blocks("Q8_0", torch.zeros(2, 48, dtype=torch.uint8), torch.ones(2, 1))


def test_q8_0_exact_recovers_a_dequantized_q8_0_tensor():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    x[1, 32:64] = 0.0
    x[2, :32] = -np.abs(x[2, :32])  # the extreme code may be -128 after rounding
    raw = quantize(x, T.Q8_0)
    back = torch.from_numpy(dequantize(raw, T.Q8_0).astype(np.float32))
    name, ours = exact_float_encoding(back, ("Q8_0", "F16", "F32"))
    assert name == "Q8_0" and np.array_equal(ours.numpy(), raw)
    # a block whose largest code is 128 (negative) or below 127 is still exact
    d = np.float16(0.01).astype(np.float32)
    special = torch.from_numpy(np.stack([np.arange(-128, 128, 8), np.arange(-40, 24, 2)]).astype(np.float32) * d)
    codes, scale = q8_0_exact(special)
    assert torch.equal((codes.float() - 128) * scale.repeat_interleave(32, 1), special)
    assert q8_0_exact(torch.randn(4, 64)) is None
    assert exact_float_encoding(torch.randn(4, 64).half().float(), ("Q8_0", "F16", "F32"))[0] == "F16"


def test_llama_rope_rows_inverts_transformers_unpermute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    for heads, kv, head_dim in ((4, 2, 32), (9, 3, 64), (4, 4, 16)):
        proc = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv})
        for name, n_head in (("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", kv)):
            rows = n_head * head_dim
            gguf_rows = torch.arange(rows)[llama_rope_rows(rows, n_head)].numpy().reshape(rows, 1)
            back = proc.process(weights=gguf_rows, name=name).weights[:, 0]
            assert np.array_equal(back, np.arange(rows)), (name, heads, kv)


# --- tiny models ---------------------------------------------------------------------------------
def make_bpe_tokenizer(extra_merges: int = 40) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 splitting): the 256 byte symbols, ``extra_merges`` merged tokens, <eos>."""
    spelling = bytes_to_unicode()
    vocab = {spelling[b]: b for b in range(256)}
    text = "the cat sat on the mat with the hat and then the rat ran to the man in the tan van"
    merges: list[tuple[str, str]] = []
    words = [[spelling[b] for b in (" " + w if i else w).encode()] for i, w in enumerate(text.split())]
    while len(merges) < extra_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + 1
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_spm_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (Gemma): ``▁`` for spaces, byte fallback, <pad>/<eos>/<bos>/<unk> first."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyz.,":
        vocab[c] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c"), ("▁c", "at"), ("▁", "s"), ("▁s", "at")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


#: module name suffix -> (bits, group_size, symmetric, zero_point): every type and widening the export writes
SCHEMES = {
    "q_proj": (4, 32, False, "float"),  # Q4_1
    "k_proj": (4, 64, False, "float"),  # Q4_1, scale repeated per 32-block
    "v_proj": (4, 128, True, "float"),  # Q4_0
    "o_proj": (8, None, True, "float"),  # Q8_0 per channel
    "gate_proj": (5, 32, False, "float"),  # Q5_1
    "up_proj": (4, 32, False, "integer"),  # Q4_1 from integer zero points (scales of 7 bits: -z*s exact)
    "down_proj": (3, 64, False, "float"),  # 3-bit widened to Q4_1
}
LAYER_SCHEMES = [SCHEMES, {**SCHEMES, "gate_proj": (5, 64, True, "float"), "down_proj": (2, 32, True, "float")}]
EXPECTED_TYPES = {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_0", "attn_output": "Q8_0", "ffn_up": "Q4_1"}


def quantize_model(model: nn.Module, layer_schemes=LAYER_SCHEMES) -> nn.Module:
    """Replace every decoder linear by a round-to-nearest `QuantLinear` of its layer's scheme."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or "layers." not in name:
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        bits, group, sym, zero = layer_schemes[layer % len(layer_schemes)][name.rpartition(".")[2]]
        q = QuantLinear.from_linear(module, bits=bits, group_size=group, symmetric=sym, zero_point=zero)
        if zero == "integer":  # scales of 7 significant bits, so that the minima -z*s are exact in float16
            mant, exp = torch.frexp(q.weight_scale.float())
            q.replace_tensors(weight_scale=torch.ldexp(torch.round(mant * 128) / 128, exp).to(q.weight_scale.dtype))
        set_submodule(model, name, q)
    return model.eval()


def tiny_llama(vocab: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    cfg = LlamaConfig(**{**kwargs, **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)  # norms that are not all ones
    return quantize_model(model)


def tiny_qwen2(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=vocab - 1,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return quantize_model(model)


def tiny_gemma3(vocab: int) -> Gemma3ForCausalLM:
    torch.manual_seed(2)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,  # = query_pre_attn_scalar (256), the scale llama.cpp uses
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return quantize_model(model)


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 120, 33, 64, 1, 2, 9, 77, 100, 12, 13, 14, 15]])


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, bpe):
    model = tiny_llama(len(bpe))
    out = tmp_path_factory.mktemp("gguf_llama")
    report = export_model(model, out, "gguf", tokenizer=bpe, progress=False)
    return model, out, report


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def test_every_quantized_type_is_written_exactly(llama_export):
    model, out, report = llama_export
    assert report.exact and report.files == ["model.gguf"] and report.engines == ["llama.cpp"]
    types = {name: t for name, (t, _) in gguf_tensor_bytes(out / "model.gguf").items()}
    for part, expected in EXPECTED_TYPES.items():
        assert types[f"blk.0.{part}.weight"] == expected
    assert types["blk.0.ffn_gate.weight"] == "Q5_1" and types["blk.1.ffn_gate.weight"] == "Q5_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "Q4_1"


def test_our_reader_gives_bit_identical_logits(llama_export):
    model, out, _ = llama_export
    again = load_gguf(out / "model.gguf")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(again.get_submodule(name).dequantize_weight(), m.dequantize_weight()), name
    assert torch.equal(_logits(again), _logits(model))


def test_transformers_gguf_loader_reads_the_same_model(llama_export, bpe):
    model, out, _ = llama_export
    ref = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    ours = _logits(model)
    assert float((_logits(ref) - ours).norm() / ours.norm()) <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    text = "the cat sat on the mat, then 42 rats!"
    assert tok(text)["input_ids"] == bpe(text)["input_ids"]
    assert tok.eos_token == "<eos>"


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_qwen2_and_gemma3_round_trip(family, tmp_path, bpe):
    spm = make_spm_tokenizer()
    model = tiny_qwen2(len(bpe)) if family == "qwen2" else tiny_gemma3(len(spm))
    tokenizer = bpe if family == "qwen2" else spm
    report = export_model(model, tmp_path, "gguf", tokenizer=tokenizer, progress=False)
    assert report.exact
    fields = gguf.GGUFReader(str(tmp_path / "model.gguf")).fields
    assert fields["general.architecture"].contents() == family
    ids = IDS % len(tokenizer)
    again = load_gguf(tmp_path / "model.gguf")
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    ours = _logits(model, ids)
    assert float((_logits(ref, ids) - ours).norm() / ours.norm()) <= 1e-5
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in gguf_tensor_bytes(tmp_path / "model.gguf")
        assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    else:
        assert fields["tokenizer.ggml.model"].contents() == "llama"
        assert fields["gemma3.attention.sliding_window"].contents() == 8
        assert fields["gemma3.attention.key_length"].contents() == 256
        types = fields["tokenizer.ggml.token_type"].contents()
        assert types[1] == gguf.TokenType.CONTROL and types[3] == gguf.TokenType.UNKNOWN
        assert types[4] == gguf.TokenType.BYTE and types[270] == gguf.TokenType.NORMAL


def test_byte_tokenizer_without_merges(tmp_path, byte_tokenizer):
    """The byte-per-token vocabulary of tests/conftest.py: an empty merges list and the default splitting."""
    model = tiny_llama(len(byte_tokenizer))
    export_model(model, tmp_path, "gguf", tokenizer=byte_tokenizer, progress=False)
    fields = gguf.GGUFReader(str(tmp_path / "model.gguf")).fields
    assert fields["tokenizer.ggml.merges"].contents() == [] and fields["tokenizer.ggml.pre"].contents() == "default"
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    text = "héllo wörld, 123<eos>"
    assert tok(text)["input_ids"] == byte_tokenizer(text)["input_ids"]
    assert torch.equal(_logits(load_gguf(tmp_path / "model.gguf")), _logits(model))


# --- refusals and lossy conversions ---------------------------------------------------------------
def _one_module_model(vocab: int, module: QuantLinear | None = None, **scheme) -> LlamaForCausalLM:
    model = tiny_llama(vocab)
    if module is None:
        linear = nn.Linear(128, 128, bias=False)
        module = QuantLinear.from_linear(linear, **scheme)
    set_submodule(model, "model.layers.0.self_attn.q_proj", module)
    return model


def _custom_module(outliers: bool = False, act_order: bool = False) -> QuantLinear:
    torch.manual_seed(5)
    linear = nn.Linear(128, 128, bias=False)
    exclude = None
    if outliers:
        exclude = torch.zeros(128, 128, dtype=torch.bool)
        exclude[:, 0] = True
    q = quantize_weight(linear.weight, 4, 32, False, exclude=exclude)
    if outliers:
        q.outlier_index = torch.zeros(128, 1, dtype=torch.int16)
        q.outlier_value = linear.weight[:, :1].detach().half()
    if act_order:
        q.perm = torch.randperm(128).to(torch.int32)
    return QuantLinear.from_quantized(linear, q, symmetric=False)


@pytest.mark.parametrize(
    "case, match",
    [
        ("asym8", "asymmetric and gguf stores 8-bit weights symmetric only"),
        ("group16", "group size 16 is not one gguf stores"),
        ("outliers", "outlier weights"),
        ("act_order", "act-order"),
        ("intzero", "integer zero points times the scales are not exact float16 minima"),
    ],
)
def test_refusals_and_lossy_conversion(case, match, tmp_path, bpe):
    if case == "asym8":
        model = _one_module_model(len(bpe), bits=8, group_size=32, symmetric=False)
    elif case == "group16":
        model = _one_module_model(len(bpe), bits=4, group_size=16, symmetric=False)
    elif case == "intzero":
        model = _one_module_model(len(bpe), bits=4, group_size=32, symmetric=False, zero_point="integer")
    else:
        model = _one_module_model(len(bpe), _custom_module(outliers=case == "outliers", act_order=case == "act_order"))
    with pytest.raises(ExportError, match=match) as err:
        export_model(model, tmp_path / "strict", "gguf", tokenizer=bpe, progress=False)
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "lossy=True" in str(err.value)
    assert not (tmp_path / "strict" / "model.gguf").exists()
    report = export_model(model, tmp_path / "lossy", "gguf", tokenizer=bpe, lossy=True, progress=False)
    change = report.changes["model.layers.0.self_attn.q_proj"]
    assert not report.exact and 0 < change.max_change < 0.5 and change.reasons
    assert report.quantized["model.layers.0.self_attn.q_proj"] == ("Q8_0" if case == "asym8" else "Q4_1")
    again = load_gguf(tmp_path / "lossy" / "model.gguf")  # the converted file is a valid GGUF of the model
    w = again.get_submodule("model.layers.0.self_attn.q_proj").dequantize_weight()
    ref = model.get_submodule("model.layers.0.self_attn.q_proj").dequantize_weight()
    assert float((w - ref).abs().max() / ref.abs().max()) == pytest.approx(change.max_change, rel=1e-5)


def _with_k_quant(src: Path, dst: Path, name: str = "blk.0.ffn_down.weight") -> None:
    """A copy of the GGUF ``src`` whose tensor ``name`` holds random (valid) Q6_K blocks."""
    from hf_efficiency.export.gguf_metadata import copy_fields

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    copy_fields(writer, reader, prefixes=("general.", "tokenizer.", f"{arch}."))
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        if t.name != name:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
            continue
        rows, n = int(t.shape[1]), int(t.shape[0])
        raw = rng.integers(0, 256, (rows * n // 256, 210), dtype=np.uint8)
        raw[:, 208:210] = (rng.standard_normal((rows * n // 256, 1)) * 1e-4).astype(np.float16).view(np.uint8)
        writer.add_tensor(name, raw.reshape(rows, -1), raw_dtype=T.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_k_quant_modules_are_refused_or_converted(llama_export, tmp_path):
    _, out, _ = llama_export
    _with_k_quant(out / "model.gguf", tmp_path / "k.gguf")
    model = load_gguf(tmp_path / "k.gguf")
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert (down.bits, down.group_size, down.weight_scale.dtype) == (6, 16, torch.float32)
    with pytest.raises(ExportError, match="model.layers.0.mlp.down_proj: .*group size 16"):
        export_model(model, tmp_path / "strict", "gguf", progress=False)  # tokenizer: copied from k.gguf
    report = export_model(model, tmp_path / "lossy", "gguf", lossy=True, progress=False)
    assert list(report.changes) == ["model.layers.0.mlp.down_proj"]
    assert report.quantized["model.layers.0.mlp.down_proj"] == "Q8_0"
    assert 0 < report.changes["model.layers.0.mlp.down_proj"].rms_change < 0.05
    written = gguf_tensor_bytes(tmp_path / "lossy" / "model.gguf")
    original = gguf_tensor_bytes(out / "model.gguf")
    assert all(written[k] == original[k] for k in original if k != "blk.0.ffn_down.weight")


def test_embedding_choices_and_measured_changes(tmp_path, bpe):
    model = tiny_llama(len(bpe))
    auto = export_model(model, tmp_path / "auto", "gguf", tokenizer=bpe, progress=False)
    assert auto.exact and any("embed_tokens: written as F32" in n for n in auto.notes)
    q8 = export_model(model, tmp_path / "q8.gguf", "gguf", tokenizer=bpe, embeddings="q8_0", progress=False)
    assert (tmp_path / "q8.gguf").is_file() and not q8.exact
    assert 0 < q8.changes["model.embed_tokens"].max_change < 0.02
    assert gguf_tensor_bytes(tmp_path / "q8.gguf")["token_embd.weight"][0] == "Q8_0"
    f16 = export_model(model, tmp_path / "f16", "gguf", tokenizer=bpe, embeddings="f16", progress=False)
    assert 0 < f16.changes["model.embed_tokens"].max_change < 1e-3
    with torch.no_grad():  # an embedding that float16 holds: "auto" picks F16
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.half().float())
    half = export_model(model, tmp_path / "half", "gguf", tokenizer=bpe, progress=False)
    assert half.exact and gguf_tensor_bytes(tmp_path / "half" / "model.gguf")["token_embd.weight"][0] == "F16"
    with pytest.raises(ValueError, match="embeddings='q4' is not allowed"):
        export_model(model, tmp_path / "x", "gguf", tokenizer=bpe, embeddings="q4")


def test_float_linears_follow_dtype(tmp_path, bpe):
    model = tiny_llama(len(bpe), tie_word_embeddings=False)
    set_submodule(model, "model.layers.1.mlp.down_proj", nn.Linear(256, 128, bias=False))  # kept in float
    report = export_model(model, tmp_path, "gguf", tokenizer=bpe, dtype="float16", progress=False)
    types = {k: t for k, (t, _) in gguf_tensor_bytes(tmp_path / "model.gguf").items()}
    assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.1.ffn_norm.weight"] == "F32"
    assert types["output.weight"] == "F32"  # the float head follows embeddings="auto", not dtype
    assert report.float_modules == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert any(n.startswith("model.layers.1.mlp.down_proj.weight: cast to F16: max change") for n in report.notes)


def test_needs_a_tokenizer_and_a_supported_family(tmp_path, bpe):
    model = tiny_llama(len(bpe))
    with pytest.raises(ExportError, match="pass tokenizer="):
        export_model(model, tmp_path, "gguf", progress=False)
    model.config.model_type = "mistral"
    with pytest.raises(ExportError, match="supports the model types llama, qwen2, gemma3_text"):
        export_model(model, tmp_path, "gguf", tokenizer=bpe, progress=False)
    no_regex = make_bpe_tokenizer()
    no_regex.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    with pytest.raises(ExportError, match="tokenizer_pre="):
        export_model(tiny_llama(len(bpe)), tmp_path, "gguf", tokenizer=no_regex, progress=False)


def test_a_tied_head_loaded_quantized_is_written_back_tied(tmp_path, bpe):
    """load_gguf keeps a tied head quantized (token_embd's blocks) beside the float embedding: the export ties
    them again (one token_embd in the head's type, no output.weight) unless they differ."""
    src = tmp_path / "src.gguf"  # a tied file with a Q8_0 token_embd
    export_model(tiny_llama(len(bpe)), src, "gguf", tokenizer=bpe, embeddings="q8_0", progress=False)
    original = gguf_tensor_bytes(src)
    assert original["token_embd.weight"][0] == "Q8_0" and "output.weight" not in original
    loaded = load_gguf(src)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.config.tie_word_embeddings is False
    report = export_model(loaded, tmp_path / "again", "gguf", tokenizer=bpe, progress=False)
    assert report.exact and report.quantized["lm_head"] == "Q8_0"
    assert any(
        n.startswith("lm_head: equal to the input embedding; both written once as token_embd") for n in report.notes
    )
    assert gguf_tensor_bytes(tmp_path / "again" / "model.gguf") == original  # every tensor: name, type, bytes
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), gguf_file="model.gguf", dtype=torch.float32)
    assert ref.config.tie_word_embeddings  # transformers (and llama.cpp) tie a file without output.weight
    assert float((_logits(ref) - _logits(loaded)).norm() / _logits(loaded).norm()) <= 1e-5

    forced = export_model(loaded, tmp_path / "f32", "gguf", tokenizer=bpe, embeddings="f32", progress=False)
    types = {k: t for k, (t, _) in gguf_tensor_bytes(tmp_path / "f32" / "model.gguf").items()}
    assert types["token_embd.weight"] == "F32" and "output.weight" not in types and forced.exact
    assert "lm_head" not in forced.quantized  # the embedding choice holds the tied pair

    with torch.no_grad():  # an embedding that is no longer the head's weight: both are written
        loaded.model.embed_tokens.weight[0] += 1.0
    both = export_model(loaded, tmp_path / "both", "gguf", tokenizer=bpe, progress=False)
    types = {k: t for k, (t, _) in gguf_tensor_bytes(tmp_path / "both" / "model.gguf").items()}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F32"
    assert both.quantized["lm_head"] == "Q8_0"
    written = gguf_tensor_bytes(tmp_path / "both" / "model.gguf")
    assert written["output.weight"] == original["token_embd.weight"]  # the head's own codes, unchanged
    again = load_gguf(tmp_path / "both" / "model.gguf")
    assert torch.equal(_logits(again), _logits(loaded))


# --- the bundled SmolLM2 GGUF ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled_round_trip(tmp_path_factory):
    from hf_efficiency.demo import bundled_gguf_path

    try:
        src = bundled_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_gguf(src)
    out = tmp_path_factory.mktemp("gguf_bundled")
    report = export_model(model, out, "gguf", progress=False)
    return src, model, out / "model.gguf", report


@pytest.mark.slow
def test_bundled_gguf_is_written_back_byte_for_byte(bundled_round_trip):
    src, model, ours, report = bundled_round_trip
    assert report.exact
    # the tied head loads as a Q8_0 QuantLinear from token_embd and is written back tied: one token_embd
    assert isinstance(model.lm_head, QuantLinear) and report.quantized["lm_head"] == "Q8_0"
    original, written = gguf_tensor_bytes(src), gguf_tensor_bytes(ours)
    assert len(original) == 272 and "output.weight" not in written
    assert set(original) == set(written)
    assert [name for name in original if original[name] != written[name]] == []
    assert {t for t, _ in written.values()} == {"Q4_1", "Q8_0", "F32"}
    a, b = gguf.GGUFReader(str(src)).fields, gguf.GGUFReader(str(ours)).fields
    for key in a:
        if key.startswith(("general.", "llama.", "tokenizer.")):
            assert key in b, key
            assert a[key].contents() == b[key].contents(), key


# --- llama.cpp ------------------------------------------------------------------------------------
LLAMA_CPP_SCRIPT = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=512, n_threads=2, logits_all=True, verbose=False)
out = {"tokenized": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job.get("texts", [])]}
if job.get("logits_of") is not None:
    llm.reset(); llm.eval(job["logits_of"])
    out["logits"] = np.asarray(llm.scores[: llm.n_tokens]).tolist()
greedy = []
for ids in job.get("greedy", []):
    llm.reset(); llm.eval(ids); new = []
    for _ in range(job["n"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(nxt)
        if nxt == job["eos"]:
            break
        llm.eval([nxt])
    greedy.append(new)
out["greedy"] = greedy
json.dump(out, open(sys.argv[2], "w"))
"""


def run_llama_cpp(tmp_path: Path, job: dict) -> dict:
    if not LLAMA_PYTHON.is_file():
        pytest.skip(f"llama.cpp venv not found at {LLAMA_PYTHON} (see shared/reference/engines.md)")
    script, job_file, out_file = tmp_path / "run_llama.py", tmp_path / "job.json", tmp_path / "out.json"
    script.write_text(LLAMA_CPP_SCRIPT)
    job_file.write_text(json.dumps(job))
    proc = subprocess.run(
        [str(LLAMA_PYTHON), str(script), str(job_file), str(out_file)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_file.read_text())


def _our_greedy(model, prompts: list[list[int]], n: int, eos: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos
            )
        out.append(gen[0, len(ids) :].tolist())
    return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Tokens generated alike before the first difference, per prompt."""
    out = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        out.append(k)
    return out


def _teacher_forced(model, prompts: list[list[int]], continuations: list[list[int]]) -> tuple[float, float]:
    """Our model reading llama.cpp's greedy continuations: the fraction of its tokens that are our argmax too,
    and the largest gap (in logits) between our best token and llama.cpp's choice."""
    hits, total, worst = 0, 0, 0.0
    for ids, new in zip(prompts, continuations):
        logits = _logits(model, torch.tensor([ids + new]))[0, len(ids) - 1 : len(ids) + len(new) - 1]
        chosen = logits.gather(1, torch.tensor(new).view(-1, 1))[:, 0]
        hits += int((logits.argmax(-1) == torch.tensor(new)).sum())
        total += len(new)
        worst = max(worst, float((logits.max(-1).values - chosen).max()))
    return hits / total, worst


def _compare_greedy(label: str, model, gguf_path: Path, prompts, eos: int, tmp_path: Path) -> dict:
    got = run_llama_cpp(tmp_path, {"model": str(gguf_path), "greedy": prompts, "n": 32, "eos": eos, "texts": PROMPTS})
    ours = _our_greedy(model, prompts, 32, eos)
    agree = _agreement(got["greedy"], ours)
    match, gap = _teacher_forced(model, prompts, got["greedy"])
    print(
        f"{label}: greedy 32 tokens, llama.cpp vs ours: identical for {sum(a == len(o) for a, o in zip(agree, ours))}"
        f"/{len(prompts)} prompts, agreeing tokens before the first difference {agree}; our argmax on llama.cpp's "
        f"tokens {match:.1%}, largest logit gap {gap:.3f}"
    )
    assert got["tokenized"] == prompts  # llama.cpp tokenizes the prompts as transformers does
    return {"llama_cpp": got["greedy"], "ours": ours, "agree": agree, "match": match, "gap": gap}


PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "The three primary colors are",
    "To make a cup of tea, you",
    "Water boils at a temperature of",
]


@pytest.mark.engines
@pytest.mark.parametrize("family", ["llama", "llama-bytes", "qwen2", "gemma3"])
def test_llama_cpp_runs_tiny_exports_with_our_logits(family, tmp_path, bpe, byte_tokenizer):
    tokenizer = {"gemma3": make_spm_tokenizer(), "llama-bytes": byte_tokenizer}.get(family, bpe)
    build = {"llama": tiny_llama, "llama-bytes": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}[family]
    model = build(len(tokenizer))
    export_model(model, tmp_path, "gguf", tokenizer=tokenizer, progress=False)
    ids = (IDS[0] % len(tokenizer)).tolist()
    texts = ["the cat sat on the mat", "the hat Zq"]
    got = run_llama_cpp(tmp_path, {"model": str(tmp_path / "model.gguf"), "logits_of": ids, "texts": texts})
    theirs, ours = torch.tensor(got["logits"]), _logits(model, torch.tensor([ids]))[0]
    rel = float((theirs - ours).norm() / ours.norm())
    print(f"{family}: llama.cpp vs ours relative logit error {rel:.2e}")
    assert rel < 2e-2 and bool((theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9)
    assert got["tokenized"] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


VARIANTS = {
    # llama3 rope (the rope_freqs tensor), q/k/v/o and MLP biases (q/k bias rows permuted), a float untied head
    "llama": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    ),
    # a per-layer sliding pattern, a local rope base, linear rope scaling on the global layer, a logit softcap
    "gemma3": dict(
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=4,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 100.0},
        },
        final_logit_softcapping=0.5,
    ),
}


def _variant(family: str, vocab: int, options: dict) -> nn.Module:
    torch.manual_seed(4)
    if family == "llama":
        base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, **base, **options)
        )
    else:
        base = dict(
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256, max_position_embeddings=256
        )
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, **base, **options)
        )
    with torch.no_grad():  # large weights: attention and rope matter, so a wrong option shows
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n or n.endswith("bias") else 0.2))
            if "norm" in n and family == "llama":
                p.add_(1.0)
    return quantize_model(model)


@pytest.mark.engines
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_llama_cpp_follows_family_options(family, tmp_path, bpe):
    tokenizer = make_spm_tokenizer() if family == "gemma3" else bpe
    model = _variant(family, len(tokenizer), VARIANTS[family])
    export_model(model, tmp_path, "gguf", tokenizer=tokenizer, progress=False)
    ids = torch.randint(0, len(tokenizer), (64,), generator=torch.Generator().manual_seed(0)).tolist()
    got = run_llama_cpp(tmp_path, {"model": str(tmp_path / "model.gguf"), "logits_of": ids})
    theirs, ours = torch.tensor(got["logits"]), _logits(model, torch.tensor([ids]))[0]
    plain = {"llama": {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}, "gemma3": {}}[family]
    without = _logits(_variant(family, len(tokenizer), plain), torch.tensor([ids]))[0]
    rel, sensitivity = float((theirs - ours).norm() / ours.norm()), float((without - ours).norm() / ours.norm())
    print(
        f"{family} options: llama.cpp vs ours {rel:.2e}; the same weights without the options differ by {sensitivity:.2e}"
    )
    assert rel < 8e-2 and sensitivity > 10 * rel  # llama.cpp: 8-bit activations, float16 KV cache


@pytest.mark.engines
def test_llama_cpp_greedy_on_bundled_and_rtn_smollm2(bundled_round_trip, tmp_path):
    """llama.cpp quantizes activations to 8 bits in its Q4_1/Q8_0 dot products, so its logits differ from our
    float32 ones by a few percent and near-ties can flip: greedy runs are compared token by token, and our
    model must rank every token llama.cpp picked within a small logit gap of its own best."""
    from hf_efficiency.demo import resolve_model_path
    from hf_efficiency.formats import gguf_tokenizer

    src, model, ours_file, _ = bundled_round_trip
    tok = gguf_tokenizer(src)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    eos = tok.eos_token_id
    exported = _compare_greedy("bundled Q4_1 re-export", model, ours_file, prompts, eos, tmp_path)
    original = run_llama_cpp(tmp_path, {"model": str(src), "greedy": prompts, "n": 32, "eos": eos})
    assert original["greedy"] == exported["llama_cpp"]  # the same bytes: the same generations
    assert exported["match"] >= 0.9 and exported["gap"] < 1.0

    float_dir = resolve_model_path("bundled")
    rtn = AutoModelForCausalLM.from_pretrained(
        float_dir, efficiency_config={"quantization": {"bits": 4, "group_size": 128}}
    ).eval()
    report = export_model(rtn, tmp_path / "rtn", "gguf", progress=False)
    assert report.exact and set(report.quantized.values()) == {"Q4_1"}
    rtn_tok = AutoTokenizer.from_pretrained(float_dir)
    prompts = [rtn_tok(p)["input_ids"] for p in PROMPTS]
    result = _compare_greedy("RTN int4 g128 SmolLM2", rtn, tmp_path / "rtn" / "model.gguf", prompts, eos, tmp_path)
    assert result["match"] >= 0.9 and result["gap"] < 1.0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-x", "-p", "no:cacheprovider", "-s", *sys.argv[1:]]))
