"""GGUF files into our quantized modules: every block type bit-exact against gguf's own
de-quantization, a tiny Llama GGUF (one ggml type per projection) matching transformers' de-quantized
load, the from_pretrained / convert entry points, and bad input."""

from __future__ import annotations

import gguf  # the demo extra (`.ci/run` installs it)
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

import hf_efficiency  # noqa: F401  (registration)
from hf_efficiency import EfficiencyConfig
from hf_efficiency.formats import FormatError, load_compressed, load_gguf, read_gguf
from hf_efficiency.formats.gguf_blocks import BLOCK_FORMATS, decode_blocks
from hf_efficiency.quant.core.scheme import dequantize_codes
from hf_efficiency.quant.modules.linear import QuantLinear

# byte offsets of the float16 super-/block scales, set to sane values in random blocks
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
}


def random_blocks(type_name: str, rows: int, n: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """Random (valid) raw blocks of ``type_name`` for a ``[rows, n]`` tensor: every code pattern occurs."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[T[type_name]]
    rng = np.random.default_rng(seed)
    nb = rows * n // block_elems
    raw = rng.integers(0, 256, (nb, block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        raw[:, off : off + 2] = (rng.standard_normal(nb) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", list(BLOCK_FORMATS))
def test_every_block_type_decodes_bit_exactly(type_name):
    fmt = BLOCK_FORMATS[type_name]
    raw = random_blocks(type_name, 5, 512, seed=fmt.block_bytes)
    ref = torch.from_numpy(dequantize(raw, T[type_name]).astype(np.float32))
    codes, scale, minimum = decode_blocks(torch.from_numpy(raw.copy()), fmt, 512)
    assert codes.dtype == torch.uint8 and int(codes.max()) == 2**fmt.bits - 1 and int(codes.min()) == 0
    assert scale.shape == (5, 512 // fmt.group_size)
    ours = dequantize_codes(
        codes,
        scale.to(fmt.exact_scale_dtype),
        None if minimum is None else minimum.to(fmt.exact_scale_dtype),
        fmt.bits,
        fmt.group_size,
        torch.float32,
    )
    assert torch.equal(ours, ref)  # the stored scale dtype holds ggml's scales exactly
    assert (minimum is None) == fmt.symmetric


def test_decode_blocks_rejects_wrong_sizes():
    with pytest.raises(ValueError, match=r"Q4_K rows hold whole blocks of 256 weights; got a row of 100"):
        decode_blocks(torch.zeros(1, 144, dtype=torch.uint8), BLOCK_FORMATS["Q4_K"], 100)
    with pytest.raises(ValueError, match=r"must be uint8 \[rows, 40\]"):
        decode_blocks(torch.zeros(1, 41, dtype=torch.uint8), BLOCK_FORMATS["Q4_1"], 64)


# --- a tiny Llama GGUF --------------------------------------------------------------------------
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 64, 2
# one ggml type per projection: legacy types through gguf's quantizer, K-quants as random blocks
LAYER_TYPES = {
    "attn_q": "Q4_0",
    "attn_k": "Q5_0",
    "attn_v": "Q8_0",
    "attn_output": "Q5_1",
    "ffn_gate": "Q4_K",
    "ffn_up": ("Q2_K", "Q3_K"),
    "ffn_down": ("Q5_K", "Q4_1"),
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SHAPES = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (HIDDEN // 2, HIDDEN),
    "attn_v": (HIDDEN // 2, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}


def _add(writer, name: str, type_name: str, shape: tuple[int, int], rng, seed: int) -> None:
    rows, n = shape
    if type_name in ("F32", "F16"):
        data = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32 if type_name == "F32" else np.float16)
        writer.add_tensor(name, data)
        return
    if type_name.endswith("_K") or type_name not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        raw = random_blocks(type_name, rows, n, seed=seed, scale=0.002)
    else:
        raw = quantize((rng.standard_normal((rows, n)) * 0.05).astype(np.float32), T[type_name])
    writer.add_tensor(name, raw, raw_dtype=T[type_name])


def write_tiny_gguf(
    path,
    *,
    override: dict[str, str] | None = None,
    shapes: dict[str, tuple] | None = None,
    output_type: str | None = "Q6_K",
    embd_type: str = "F32",
) -> None:
    """A 2-layer Llama GGUF (hidden 256, GQA 4/2 heads) with the types of LAYER_TYPES; ``output_type=None``
    writes no output.weight (a tied head, as llama.cpp's converter writes tied models)."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    _add(w, "token_embd.weight", embd_type, (VOCAB, HIDDEN), rng, 0)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        for j, (part, types) in enumerate(LAYER_TYPES.items()):
            type_name = types if isinstance(types, str) else types[i]
            type_name = (override or {}).get(f"blk.{i}.{part}", type_name)
            shape = (shapes or {}).get(f"blk.{i}.{part}", SHAPES[part])
            _add(w, f"blk.{i}.{part}.weight", type_name, shape, rng, seed=100 * i + j)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    if output_type is not None:
        _add(w, "output.weight", output_type, (VOCAB, HIDDEN), rng, 999)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()


# 24 token rows: more than the fused CPU kernel's 16, so the quantized layers de-quantize (bit-identically to
# the float weights) and run the same float GEMM as the reference: logits are comparable bit for bit.
IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 63, 40], [3, 3, 8, 21, 60, 0, 12, 7], [9, 8, 7, 6, 5, 4, 3, 2]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _decode_logits_close(model, reference):
    """One token row (the fused kernel's decode path): equal up to float rounding of the summation order."""
    ids = IDS[:1, :1]
    ref = _logits(reference, ids)
    assert (_logits(model, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_tiny_gguf_matches_transformers_dequantized_load(tiny_gguf, reference):
    model, report = load_gguf(tiny_gguf, output_loading_info=True)
    for name, linear in reference.named_modules():
        if isinstance(linear, torch.nn.Linear):  # same weights, bit for bit
            assert torch.equal(model.get_submodule(name).dequantize_weight(), linear.weight), name
    assert torch.equal(_logits(model), _logits(reference))
    _decode_logits_close(model, reference)
    expected = {  # (bits, group, symmetric, scale dtype, stored bits per weight)
        "Q4_0": (4, 32, True, torch.float16, 4.5),
        "Q5_0": (5, 32, True, torch.float16, 5.5),
        "Q8_0": (8, 32, True, torch.float16, 8.5),
        "Q5_1": (5, 32, False, torch.float16, 6.0),
        "Q4_1": (4, 32, False, torch.float16, 5.0),
        "Q4_K": (4, 32, False, torch.float32, 6.0),
        "Q5_K": (5, 32, False, torch.float32, 7.0),
        "Q2_K": (2, 16, False, torch.float32, 6.0),
        "Q3_K": (3, 16, True, torch.float32, 5.0),
        "Q6_K": (6, 16, True, torch.float32, 8.0),
    }
    for i in range(LAYERS):
        for part, types in LAYER_TYPES.items():
            type_name = types if isinstance(types, str) else types[i]
            m = model.get_submodule(f"model.layers.{i}.{HF_NAMES[part]}")
            assert isinstance(m, QuantLinear)
            bits, g, sym, sdt, bpw = expected[type_name]
            assert (m.bits, m.group_size, m.symmetric, m.weight_scale.dtype) == (bits, g, sym, sdt), (i, part)
            assert m.storage_bits_per_weight == pytest.approx(bpw)
    head = model.lm_head  # untied output.weight, Q6_K
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size) == (6, 16)

    assert report["types"]["Q6_K"] == 1 and report["types"]["F32"] == 1 + 2 * LAYERS + 1
    assert report["rounded"] == {} and report["float_fallback"] == []
    cfg = model.config.quantization_config
    assert cfg.quantization.module_formats["lm_head"]["bits"] == 6


def test_round_trip_through_our_format_and_plain_from_pretrained(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_gguf(tiny_gguf)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again), _logits(model))
    assert isinstance(again.model.layers[1].mlp.up_proj, QuantLinear)
    assert again.model.layers[1].mlp.up_proj.bits == 3


def test_from_pretrained_keep_compressed_entry_points(tiny_gguf, reference):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = EfficiencyConfig(keep_compressed=True, attention={"kv_cache_bits": 8})
    auto = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, efficiency_config=cfg)
    assert isinstance(auto, LlamaForCausalLM) and isinstance(auto.model.layers[0].self_attn.q_proj, QuantLinear)
    assert auto.config.quantization_config.attention.kv_cache_bits == 8  # other sections are kept
    assert torch.equal(_logits(auto), _logits(reference))
    direct = LlamaForCausalLM.from_pretrained(str(tiny_gguf), efficiency_config={"keep_compressed": True})
    assert torch.equal(_logits(direct), _logits(reference))
    assert torch.equal(_logits(load_compressed(tiny_gguf, dtype=torch.float32)), _logits(reference))
    with pytest.raises(ValueError, match="keep_compressed=True loads the checkpoint's own quantization"):
        AutoModelForCausalLM.from_pretrained(
            str(tiny_gguf.parent),
            gguf_file=tiny_gguf.name,
            efficiency_config=EfficiencyConfig(keep_compressed=True, quantization={"bits": 4}),
        )


def test_keep_compressed_refuses_a_float_folder(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    with pytest.raises(FormatError, match="not a GGUF file nor a folder whose config.json has a quantization_config"):
        AutoModelForCausalLM.from_pretrained(tmp_path, efficiency_config=EfficiencyConfig(keep_compressed=True))
    with pytest.raises(FormatError, match="org/model: no such local file or folder; keep_compressed reads local"):
        load_compressed("org/model")


def test_rounded_k_quant_scales_report_their_error(tiny_gguf, reference):
    model, report = load_gguf(tiny_gguf, scale_dtype="float16", output_loading_info=True)
    m = model.model.layers[0].mlp.gate_proj  # Q4_K
    assert m.weight_scale.dtype == torch.float16 and m.storage_bits_per_weight == pytest.approx(5.0)
    rounded = report["rounded"]
    assert set(rounded) == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "lm_head",
    }  # the K-quants only
    assert all(0 < e < 2e-3 for e in rounded.values())
    ref = _logits(reference)
    diff = (_logits(model) - ref).abs().max() / ref.abs().max()
    assert 0 < diff < 1e-2


def test_unsupported_type_is_named_or_loaded_in_float(tmp_path):
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, override={"blk.1.attn_v": "IQ4_NL"})
    with pytest.raises(
        FormatError,
        match=r"tensor 'blk.1.attn_v.weight' \(model.layers.1.self_attn.v_proj.weight\) "
        r"uses ggml type IQ4_NL.*unsupported='float'",
    ):
        load_gguf(path)
    from transformers import AutoModelForCausalLM

    model, report = load_gguf(path, unsupported="float", output_loading_info=True)
    assert isinstance(model.model.layers[1].self_attn.v_proj, torch.nn.Linear)
    assert report["float_fallback"] == ["model.layers.1.self_attn.v_proj"]
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    assert torch.equal(_logits(model), _logits(ref))


def test_truncated_file_and_mismatched_shape_are_named(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(FormatError, match=r"cut.gguf: file is truncated: tensor 'output.weight' ends at byte"):
        load_gguf(cut)
    from hf_efficiency.formats.gguf import load_gguf_config

    bad = tmp_path / "bad.gguf"
    write_tiny_gguf(bad, shapes={"blk.0.attn_k": (HIDDEN, HIDDEN)})
    config = load_gguf_config(str(tmp_path), "bad.gguf")
    with pytest.raises(
        FormatError,
        match=r"tensor 'blk.0.attn_k.weight' \(model.layers.0.self_attn.k_proj.weight\) "
        r"has shape \[256, 256\], expected \[128, 256\]",
    ):
        read_gguf(bad, config, progress=False)
    with pytest.raises(ValueError, match="unsupported='ignore' is not allowed"):
        read_gguf(bad, config, unsupported="ignore")
    with pytest.raises(ValueError, match="scale_dtype='int8' is not allowed; allowed values: None, float16"):
        read_gguf(bad, config, scale_dtype="int8")


def test_convert_cli_writes_a_folder_plain_from_pretrained_loads(tiny_gguf, reference, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_efficiency.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(tiny_gguf), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tensor types: F32 x6, Q2_K x1, Q3_K x1, Q4_0 x2" in printed and "(gguf)" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(model), _logits(reference))
    assert main(["convert", str(out), "--out", str(tmp_path / "x")]) == 2  # our own folder is not a source
    assert "not a GGUF file nor a folder" in capsys.readouterr().err


# --- a tied head (no output.weight) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_tied") / "tied.gguf"
    write_tiny_gguf(path, output_type=None, embd_type="Q8_0")
    return path


def _token_embd(path) -> torch.Tensor:
    """gguf's own de-quantization of the file's token_embd."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    return torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32))


def test_tied_head_loads_quantized_from_token_embd(tied_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = load_gguf(tied_gguf, output_loading_info=True)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size, head.symmetric) == (8, 32, True)
    assert head.weight_scale.dtype == torch.float16 and head.storage_bits_per_weight == pytest.approx(8.5)
    assert model.config.tie_word_embeddings is False and model.config.get_text_config().tie_word_embeddings is False
    assert report["tied_head"] == "lm_head" and report["types"]["Q8_0"] == 1 + LAYERS  # token_embd + attn_v
    emb = model.model.embed_tokens.weight
    assert type(model.model.embed_tokens) is torch.nn.Embedding and emb.dtype == torch.float32
    expected = _token_embd(tied_gguf)
    assert torch.equal(emb, expected)  # the input embedding: float, as before
    assert torch.equal(head.dequantize_weight(), expected)  # the head: the same matrix, from the file's blocks
    assert model.config.quantization_config.quantization.format_of("lm_head")["bits"] == 8

    tied = load_gguf(tied_gguf, tied_head="float")  # the tied float head of before
    assert type(tied.lm_head) is torch.nn.Linear and tied.config.tie_word_embeddings is True
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    ref = _logits(tied)
    assert (_logits(model) - ref).abs().max() <= 1e-5 * ref.abs().max()  # same weights, other summation order
    _decode_logits_close(model, tied)

    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.lm_head, QuantLinear) and again.config.tie_word_embeddings is False
    assert torch.equal(again.lm_head.weight, head.weight) and torch.equal(again.model.embed_tokens.weight, emb)
    assert torch.equal(_logits(again), _logits(model))


def test_tied_head_choice_is_validated_and_unsupported_types_stay_tied(tied_gguf, tmp_path):
    from hf_efficiency.formats.gguf import load_gguf_config

    for call in (
        lambda: load_gguf(tied_gguf, tied_head="bogus"),
        lambda: read_gguf(tied_gguf, load_gguf_config(str(tied_gguf.parent), tied_gguf.name), tied_head="bogus"),
    ):
        with pytest.raises(ValueError, match="tied_head='bogus' is not allowed; allowed values: quantized, float"):
            call()
    f32 = tmp_path / "f32.gguf"  # a float token_embd: nothing to keep compressed, the head stays tied
    write_tiny_gguf(f32, output_type=None)
    model, report = load_gguf(f32, output_loading_info=True)
    assert report["tied_head"] is None and model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    k = tmp_path / "k.gguf"  # a K-quant token_embd: the head takes its type (and scale_dtype rounds it)
    write_tiny_gguf(k, output_type=None, embd_type="Q6_K")
    model, report = load_gguf(k, scale_dtype="float16", output_loading_info=True)
    assert isinstance(model.lm_head, QuantLinear) and (model.lm_head.bits, model.lm_head.group_size) == (6, 16)
    assert model.lm_head.weight_scale.dtype == torch.float16 and 0 < report["rounded"]["lm_head"] < 2e-3
    assert torch.equal(model.model.embed_tokens.weight, _token_embd(k))  # the embedding itself is not rounded


def test_tied_head_follows_transformers_row_order(tied_gguf, monkeypatch):
    """A processor that reorders token_embd's rows reorders the head's codes alike; one that changes values
    leaves the head tied to the float embedding."""
    from transformers import modeling_gguf_pytorch_utils as mgu

    base = mgu.TENSOR_PROCESSORS["llama"]

    def processor(change):
        class Processor(base):
            def process(self, weights, name, **kwargs):
                result = super().process(weights, name, **kwargs)
                if name == "token_embd.weight":
                    result = mgu.GGUFTensor(change(np.asarray(result.weights)), result.name, result.metadata)
                return result

        return Processor

    monkeypatch.setitem(mgu.TENSOR_PROCESSORS, "llama", processor(lambda w: w[::-1].copy()))
    model = load_gguf(tied_gguf)
    expected = _token_embd(tied_gguf).flip(0)
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert isinstance(model.lm_head, QuantLinear) and torch.equal(model.lm_head.dequantize_weight(), expected)

    monkeypatch.setitem(mgu.TENSOR_PROCESSORS, "llama", processor(lambda w: w * 2))
    model, report = load_gguf(tied_gguf, output_loading_info=True)
    assert report["tied_head"] is None and model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, 2 * _token_embd(tied_gguf))
