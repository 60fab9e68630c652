"""GPTQ and AWQ checkpoint folders read into our QuantLinear exactly.

The folders are written by reference packers transcribed from the formats' definitions (AutoGPTQ's
``QuantLinear.pack`` bit loops, AutoAWQ's ``WQLinear_GEMM/GEMV.from_linear``), not by our reader's
code; the expected float weights come from the reference formulas computed in float32.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import reference_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_efficiency  # noqa: F401  (registers our quantizer)
from hf_efficiency.formats.common import FormatError, format_of
from hf_efficiency.formats.folders import detect_folder_format, load_folder
from hf_efficiency.formats.gptq import AWQ_ORDER, exact_weight
from hf_efficiency.quant.core.packing import unpack
from hf_efficiency.quant.modules.linear import QuantLinear

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def tiny_config(tie: bool = False, intermediate: int = 96, attention_bias: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=attention_bias,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def linear_names(config: LlamaConfig) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(config.num_hidden_layers) for s in LINEARS]


def float_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ ``QuantLinear.pack``'s loop: rows of ``values [n, cols]`` (unsigned) packed along dim 0
    into int32 ``[n*bits/32, cols]`` (3 bits: 10 values per word and values straddling words)."""
    v = values.to(torch.int64)
    rows = v.shape[0] // 32 * bits
    out = torch.zeros(rows, v.shape[1], dtype=torch.int64)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= v[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(i, i + 10):
                out[row] |= v[j] << (3 * (j - i))
            i += 10
            out[row] |= v[i] << 30
            row += 1
            out[row] |= (v[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= v[i] << 31
            row += 1
            out[row] |= (v[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return to_int32(out)


def awq_pack_cols(values: torch.Tensor, order=AWQ_ORDER) -> torch.Tensor:
    """AutoAWQ's ``from_linear`` loop: ``values [rows, n]`` (4-bit) packed 8 per word along dim 1,
    ``word[:, c] |= values[:, 8c + order[k]] << 4k``."""
    v = values.to(torch.int64)
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for col in range(v.shape[1] // 8):
        for k in range(8):
            out[:, col] |= v[:, col * 8 + order[k]] << (4 * k)
    return to_int32(out)


def write_folder(
    path, config: LlamaConfig, quantization_config: dict, tensors: dict[str, torch.Tensor], shards: int = 1
) -> str:
    os.makedirs(path, exist_ok=True)
    data = config.to_dict()
    data["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(data, fh)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return str(path)
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return str(path)


def float_tensors(model: LlamaForCausalLM, skip: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor but the quantized linears' weights, in float16 as GPTQ/AWQ checkpoints hold them."""
    out = {}
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] in skip:
            continue
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[k] = v.half()
    return out


def random_codes(out_f, in_f, bits, gen):
    return torch.randint(0, 2**bits, (out_f, in_f), generator=gen)


# ----------------------------------------------------------------------------- GPTQ folder builder


def gptq_folder(
    path,
    config,
    bits=4,
    group_size=32,
    sym=True,
    fmt="gptq",
    act_order=False,
    seed=0,
    bias=True,
    shards=1,
    extra_config=None,
):
    """A GPTQ folder for ``config``; returns (path, tensors, {linear: reference float32 weight}, g_idx)."""
    gen = torch.Generator().manual_seed(seed)
    model = float_model(config, seed)
    names = linear_names(config)
    tensors = float_tensors(model, names)
    weights, g_idxs = {}, {}
    for name in names:
        lin = model.get_submodule(name)
        n_out, n_in = lin.out_features, lin.in_features
        gs = n_in if group_size == -1 else group_size
        groups = -(-n_in // gs)
        q = random_codes(n_out, n_in, bits, gen)  # [out, in]
        if sym:
            zeros = torch.full((groups, n_out), 2 ** (bits - 1))
        elif fmt == "gptq":  # v1 stores zero - 1: real zeros in [1, 2**bits]
            zeros = torch.randint(1, 2**bits + 1, (groups, n_out), generator=gen)
        else:
            zeros = torch.randint(0, 2**bits, (groups, n_out), generator=gen)
        scales = (torch.rand(groups, n_out, generator=gen) * 0.02 + 0.001).half()
        g_idx = torch.arange(n_in) // gs
        if act_order:
            p = torch.randperm(n_in, generator=gen)
            g_idx = torch.empty_like(g_idx)
            g_idx[p] = torch.arange(n_in) // gs
        stored_zeros = zeros - 1 if fmt == "gptq" else zeros
        tensors[f"{name}.qweight"] = gptq_pack_dim0(q.t(), bits)
        tensors[f"{name}.qzeros"] = gptq_pack_dim0(stored_zeros.t(), bits).t().contiguous()
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
        if lin.bias is not None:  # a real bias (stored in float16 like the rest)
            tensors[f"{name}.bias"] = (torch.randn(n_out, generator=gen) * 0.1).half()
        elif bias:  # AutoGPTQ writes a zero bias for bias-free linears too
            tensors[f"{name}.bias"] = torch.zeros(n_out, dtype=torch.float16)
        # reference: w[o, i] = scales[g_idx[i], o] * (q[o, i] - zeros[g_idx[i], o]) in float32
        weights[name] = scales.float()[g_idx].t() * (q.float() - zeros.float()[g_idx].t())
        g_idxs[name] = g_idx
    qc = {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": 0.01,
        "desc_act": act_order,
        "sym": sym,
        "true_sequential": True,
        "quant_method": "gptq",
        "checkpoint_format": fmt,
        "model_name_or_path": None,
        "model_file_base_name": None,
    }
    qc.update(extra_config or {})
    write_folder(path, config, qc, tensors, shards=shards)
    return str(path), tensors, weights, g_idxs


def assert_matches_reference(model, config, tensors, weights, tokens=None):
    for name, w in weights.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        assert torch.equal(module.dequantize_weight(torch.float32), w), name
    ref = reference_model(config, tensors, weights)
    ids = (
        torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        if tokens is None
        else tokens
    )
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    return ids, got


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_bits_symmetric_are_exact_and_keep_fp16_scales(tmp_path, bits):
    config = tiny_config()
    path, tensors, weights, _ = gptq_folder(tmp_path / "gptq", config, bits=bits, group_size=32, sym=True)
    assert detect_folder_format(path) == "gptq"
    model = load_folder(path)
    assert_matches_reference(model, config, tensors, weights)
    for name in weights:
        m = model.get_submodule(name)
        assert (m.bits, m.group_size, m.symmetric) == (bits, 32, True)
        assert m.weight_scale.dtype == torch.float16 and m.weight_min is None and m.weight_perm is None
        assert m.storage_bits_per_weight == pytest.approx(bits + 16 / 32)
        # no repacking: for in % 32 == 0 our words are GPTQ's qweight transposed
        assert torch.equal(m.weight, tensors[f"{name}.qweight"].t())
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert "lm_head" in model.config.quantization_config.quantization.modules_to_not_convert


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_asymmetric_zeros_v1_and_v2(tmp_path, fmt):
    config = tiny_config()
    path, tensors, weights, _ = gptq_folder(tmp_path / fmt, config, bits=4, group_size=32, sym=False, fmt=fmt)
    model = load_folder(path)
    assert_matches_reference(model, config, tensors, weights)
    kinds = set()
    for name in weights:
        m = model.get_submodule(name)
        assert (m.bits, m.group_size, m.symmetric) == (4, 32, False)
        zeros = unpack(tensors[f"{name}.qzeros"], 4, m.out_features) + (1 if fmt == "gptq" else 0)
        if int(zeros.max()) <= 15:  # every zero fits 4 bits: integer zero points, float16 scales kept
            assert m.zero_point == "integer" and m.weight_min is None and m.weight_zero.dtype == torch.uint8
            assert torch.equal(m.weight_zero, zeros.t().to(torch.uint8))
            assert m.weight_scale.dtype == torch.float16
            assert m.storage_bits_per_weight == pytest.approx(4 + (16 + 8) / 32)
        else:  # a v1 zero of 16: minimum = -zero*scale, not exact in float16: scale and minimum in float32
            assert m.zero_point == "float" and m.weight_zero is None
            assert m.weight_scale.dtype == torch.float32 and m.weight_min.dtype == torch.float32
            assert m.storage_bits_per_weight == pytest.approx(4 + 64 / 32)
        kinds.add(m.zero_point)
    assert kinds == ({"integer"} if fmt == "gptq_v2" else {"float"})  # v1 zeros in [1, 16]: a 16 per module
    formats = model.config.quantization_config.quantization
    assert formats.zero_point == ("integer" if fmt == "gptq_v2" else "float")


def test_gptq_act_order_3bit_v2_sharded_with_bias_and_save_reload(tmp_path):
    config = tiny_config(attention_bias=True)
    path, tensors, weights, g_idxs = gptq_folder(
        tmp_path / "ao", config, bits=3, group_size=32, sym=False, fmt="gptq_v2", act_order=True, shards=2
    )
    model = load_folder(path)
    ids, logits = assert_matches_reference(model, config, tensors, weights)
    for name, g_idx in g_idxs.items():
        m = model.get_submodule(name)
        assert m.weight_perm is not None
        assert torch.equal(g_idx[m.weight_perm.long()], torch.arange(m.in_features) // 32)  # groups contiguous
        assert m.zero_point == "integer" and m.weight_scale.dtype == torch.float16
        assert m.storage_bits_per_weight == pytest.approx(3 + (16 + 8) / 32 + 32 / m.out_features)
    out = tmp_path / "saved"
    assert model.get_submodule("model.layers.0.self_attn.q_proj").bias is not None
    assert model.get_submodule("model.layers.0.mlp.up_proj").bias is None  # zero bias dropped
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.get_submodule(next(iter(weights))), QuantLinear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_gptq_per_channel_and_gptqmodel_dynamic_overrides(tmp_path):
    """group_size -1 (one group per row); GPTQModel's ``dynamic`` gives layer 1's MLP 8 bits and
    skips layer 1's o_proj (kept float)."""
    config = tiny_config()
    gen = torch.Generator().manual_seed(3)
    model = float_model(config, 3)
    names = linear_names(config)
    skipped = "model.layers.1.self_attn.o_proj"
    quantized = [n for n in names if n != skipped]
    tensors = float_tensors(model, quantized)
    weights = {}
    for name in quantized:
        bits = 8 if name.startswith("model.layers.1.mlp") else 4
        lin = model.get_submodule(name)
        q = random_codes(lin.out_features, lin.in_features, bits, gen)
        zeros = torch.full((1, lin.out_features), 2 ** (bits - 1))
        scales = (torch.rand(1, lin.out_features, generator=gen) * 0.02 + 0.001).half()
        tensors[f"{name}.qweight"] = gptq_pack_dim0(q.t(), bits)
        tensors[f"{name}.qzeros"] = gptq_pack_dim0(zeros.t(), bits).t()  # v2: no offset
        tensors[f"{name}.scales"] = scales
        weights[name] = scales.float().t() * (q.float() - zeros.float().t())
    qc = {
        "bits": 4,
        "group_size": -1,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "quant_method": "gptq",
        "format": "gptq_v2",
        "checkpoint_format": "gptq_v2",
        "pack_dtype": "int32",
        "dynamic": {r"-:.*layers\.1\.self_attn\.o_proj": {}, r"+:.*layers\.1\.mlp\..*": {"bits": 8}},
        "meta": {"quantizer": ["gptqmodel:4.0.0"]},
    }
    path = write_folder(tmp_path / "dyn", config, qc, tensors)
    loaded = load_folder(path)
    assert_matches_reference(loaded, config, {**tensors, f"{skipped}.weight": tensors[f"{skipped}.weight"]}, weights)
    assert not isinstance(loaded.get_submodule(skipped), QuantLinear)
    assert loaded.get_submodule("model.layers.1.mlp.up_proj").bits == 8
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").bits == 4
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").group_size is None


def test_exact_weight_keeps_16bit_scales_when_the_minimum_is_exact():
    scale = torch.tensor([[2.0**-7, 2.0**-5]], dtype=torch.float16)  # zero*scale exact in float16
    zeros = torch.tensor([[3, 16]])
    codes = torch.randint(0, 16, (1, 64), generator=torch.Generator().manual_seed(0))
    q, sym = exact_weight(codes, zeros, scale, 4, 32, 64)
    assert not sym and q.scale.dtype == torch.float16 and q.minimum.dtype == torch.float16
    want = (codes.float() - zeros.float().repeat_interleave(32, 1)) * scale.float().repeat_interleave(32, 1)
    assert torch.equal(q.dequantize(), want)


def test_exact_weight_stores_integer_zero_points_when_they_fit():
    scale = (torch.rand(2, 2, generator=torch.Generator().manual_seed(1)) * 0.02 + 1e-3).to(torch.bfloat16)
    zeros = torch.tensor([[0, 15], [7, 3]])
    codes = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(0))
    q, sym = exact_weight(codes, zeros, scale, 4, 32, 64)
    assert not sym and q.minimum is None and q.zero.dtype == torch.uint8 and torch.equal(q.zero, zeros.to(torch.uint8))
    assert q.scale.dtype == torch.bfloat16 and torch.equal(q.scale, scale)
    want = (codes.float() - zeros.float().repeat_interleave(32, 1)) * scale.float().repeat_interleave(32, 1)
    assert torch.equal(q.dequantize(), want)
    assert format_of(q, sym)["zero_point"] == "integer"


# ----------------------------------------------------------------------------- AWQ


def awq_folder(path, config, version="gemm", group_size=32, seed=0, sym_modules=(), extra=None):
    gen = torch.Generator().manual_seed(seed)
    model = float_model(config, seed)
    names = linear_names(config)
    tensors = float_tensors(model, names)
    weights = {}
    for name in names:
        lin = model.get_submodule(name)
        n_out, n_in = lin.out_features, lin.in_features
        g = n_in if group_size == -1 else group_size
        groups = n_in // g
        intweight = random_codes(n_out, n_in, 4, gen)  # [out, in]
        zeros = (
            torch.full((n_out, groups), 8)
            if name in sym_modules
            else torch.randint(0, 16, (n_out, groups), generator=gen)
        )
        scales = (torch.rand(n_out, groups, generator=gen) * 0.02 + 0.001).half()
        if version == "gemm":  # WQLinear_GEMM: [in, out/8] interleaved, zeros [G, out/8], scales [G, out]
            tensors[f"{name}.qweight"] = awq_pack_cols(intweight.t())
            tensors[f"{name}.qzeros"] = awq_pack_cols(zeros.t())
            tensors[f"{name}.scales"] = scales.t().contiguous()
        else:  # WQLinear_GEMV: [out, in/8] natural order; zeros/scales padded to calculate_zeros_width
            width = -(-(n_in // g) // 8)
            width = -(-width // {32: 4, 64: 2}.get(g, 1)) * {32: 4, 64: 2}.get(g, 1)
            padded_zeros = torch.zeros(n_out, width * 8, dtype=torch.int64)
            padded_zeros[:, :groups] = zeros
            padded_scales = torch.zeros(n_out, width * 8, dtype=torch.float16)
            padded_scales[:, :groups] = scales
            tensors[f"{name}.qweight"] = awq_pack_cols(intweight, order=range(8))
            tensors[f"{name}.qzeros"] = awq_pack_cols(padded_zeros, order=range(8))
            tensors[f"{name}.scales"] = padded_scales
        g_of = torch.arange(n_in) // g
        weights[name] = (intweight.float() - zeros.float()[:, g_of]) * scales.float()[:, g_of]
    qc = {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size,
        "bits": 4,
        "version": version,
        "modules_to_not_convert": None,
    }
    qc.update(extra or {})
    write_folder(path, config, qc, tensors)
    return str(path), tensors, weights


@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_awq_gemm_and_gemv_are_exact(tmp_path, version):
    config = tiny_config(tie=True)
    sym = ("model.layers.0.self_attn.q_proj",)
    path, tensors, weights = awq_folder(tmp_path / version, config, version=version, sym_modules=sym)
    assert detect_folder_format(path) == "awq"
    model = load_folder(path)
    ids, logits = assert_matches_reference(model, config, tensors, weights)
    for name in weights:
        m = model.get_submodule(name)
        assert (m.bits, m.group_size, m.symmetric) == (4, 32, name in sym)
        assert m.zero_point == ("float" if name in sym else "integer")
        assert m.storage_bits_per_weight == pytest.approx(4 + (16 if name in sym else 24) / 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied output stays float and tied
    if version == "gemm":
        out = tmp_path / "saved"
        model.save_pretrained(out)
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, logits)


def test_awq_packed_by_autoawq_itself(tmp_path):
    """AutoAWQ's own ``WQLinear_GEMM.from_linear`` packer (pure Python; skipped without autoawq)."""
    gemm = pytest.importorskip("awq.modules.linear.gemm")
    config = tiny_config()
    model = float_model(config, 5)
    names = linear_names(config)
    tensors = float_tensors(model, names)
    gen = torch.Generator().manual_seed(5)
    weights = {}
    for name in names:
        lin = model.get_submodule(name)
        groups = lin.in_features // 32
        scales = (torch.rand(groups, lin.out_features, generator=gen) * 0.02 + 0.001).half()
        zeros = torch.randint(0, 16, (groups, lin.out_features), generator=gen)
        codes = random_codes(lin.out_features, lin.in_features, 4, gen)
        g_of = torch.arange(lin.in_features) // 32
        w = (codes.float() - zeros.float().t()[:, g_of]) * scales.float().t()[:, g_of]
        src = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        src.weight.data = w  # from_linear rounds (w + zeros*scales) / scales back to the codes
        q = gemm.WQLinear_GEMM.from_linear(src, 4, 32, scales=scales, zeros=zeros)
        tensors.update({f"{name}.qweight": q.qweight, f"{name}.qzeros": q.qzeros, f"{name}.scales": q.scales})
        weights[name] = w
    qc = {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 32,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    path = write_folder(tmp_path / "autoawq", config, qc, tensors)
    assert_matches_reference(load_folder(path), config, tensors, weights)


# ----------------------------------------------------------------------------- errors


def test_truncated_file_names_the_file(tmp_path):
    path, *_ = gptq_folder(tmp_path / "t", tiny_config())
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as fh:
        fh.truncate(os.path.getsize(file) - 100)
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated"):
        load_folder(path)


def test_missing_shard_and_bad_index_name_the_file(tmp_path):
    path, *_ = gptq_folder(tmp_path / "s", tiny_config(), shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(FormatError, match="model-00002-of-00002.safetensors"):
        load_folder(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(FormatError, match=r"model\.safetensors\.index\.json"):
        load_folder(path)


def test_mismatched_shape_names_the_tensor(tmp_path):
    # a folder packed at 8 bits but declared 4-bit: qweight has twice the expected rows
    path, *_ = gptq_folder(tmp_path / "m", tiny_config(), bits=8)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as fh:
        data = json.load(fh)
    data["quantization_config"]["bits"] = 4
    with open(cfg_file, "w") as fh:
        json.dump(data, fh)
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj\.qweight.*model\.safetensors.*shape"):
        load_folder(path)


def test_unsupported_bits_and_formats(tmp_path):
    config = tiny_config()
    path, *_ = gptq_folder(tmp_path / "b", config, extra_config={"bits": 5})
    with pytest.raises(FormatError, match=r"config\.json.*bits=5.*supported: 2, 3, 4, 8"):
        load_folder(path)
    path, *_ = gptq_folder(tmp_path / "marlin", config, extra_config={"checkpoint_format": "marlin"})
    with pytest.raises(FormatError, match="checkpoint_format='marlin'"):
        load_folder(path)
    for version in ("gemv_fast", "marlin", "exllama", "ipex"):
        path, *_ = awq_folder(tmp_path / version, config, extra={"version": version})
        with pytest.raises(FormatError, match=f"AWQ version '{version}' is not supported; supported: gemm, gemv"):
            load_folder(path)
    path, *_ = awq_folder(tmp_path / "awq8", config, extra={"bits": 8})
    with pytest.raises(FormatError, match="AWQ bits=8"):
        load_folder(path)
    plain = tmp_path / "plain"
    LlamaForCausalLM(config).save_pretrained(plain)
    assert detect_folder_format(plain) is None and detect_folder_format(tmp_path / "nowhere") is None
    with pytest.raises(FormatError, match="no quantization_config is not a supported checkpoint format"):
        load_folder(plain)
    path, *_ = awq_folder(tmp_path / "bnb", config, extra={"quant_method": "bitsandbytes"})
    assert detect_folder_format(path) is None
    with pytest.raises(FormatError, match="quant_method 'bitsandbytes'.*supported quant_method: gptq, awq"):
        load_folder(path)


def test_nonzero_bias_on_bias_free_linear_and_bad_g_idx(tmp_path):
    config = tiny_config()
    path, tensors, _, _ = gptq_folder(tmp_path / "bias", config)
    tensors["model.layers.1.mlp.up_proj.bias"] = torch.ones(96, dtype=torch.float16)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.bias.*nonzero"):
        load_folder(path)
    path, tensors, _, _ = gptq_folder(tmp_path / "gidx", config)
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"].clone()
    g_idx[0] = 1  # group 0 loses a member, group 1 gains one
    tensors["model.layers.0.mlp.down_proj.g_idx"] = g_idx
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(FormatError, match=r"model\.layers\.0\.mlp\.down_proj\.g_idx.*does not give every group 32"):
        load_folder(path)


def test_qweight_for_a_module_the_model_lacks(tmp_path):
    path, tensors, _, _ = gptq_folder(tmp_path / "x", tiny_config())
    tensors["model.layers.0.mlp.extra_proj.qweight"] = torch.zeros(8, 64, dtype=torch.int32)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(FormatError, match=r"model\.layers\.0\.mlp\.extra_proj\.qweight.*no nn\.Linear"):
        load_folder(path)
