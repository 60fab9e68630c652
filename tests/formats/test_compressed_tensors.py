"""compressed-tensors checkpoint folders read into our QuantLinear exactly.

Folders are written (a) by a reference packer transcribed from the format's definition (signed
values offset by ``2**(b-1)``, ``32/b`` consecutive values per int32 word, little-endian; zero
points packed the same way along the output dimension) and (b) by compressed-tensors itself
(``apply_quantization_config`` + ``ModelCompressor``), whose own decompression our weights must match.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import reference_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_efficiency  # noqa: F401  (registers our quantizer)
from hf_efficiency.formats.common import FormatError
from hf_efficiency.formats.folders import detect_folder_format, load_folder
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


def tiny_config(intermediate: int = 96, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def linear_names(config) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(config.num_hidden_layers) for s in LINEARS]


def ct_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The pack-quantized layout of unsigned values ``[rows, n]``: word ``k`` of a row holds values
    ``k*(32/b) ... k*(32/b) + 32/b - 1`` at bit offsets ``0, b, 2b, ...`` (``ceil(n*b/32)`` words)."""
    per = 32 // bits
    v = values.to(torch.int64)
    words = -(-v.shape[1] // per)
    v = torch.nn.functional.pad(v, (0, words * per - v.shape[1]))
    out = torch.zeros(v.shape[0], words, dtype=torch.int64)
    for k in range(words):
        for j in range(per):
            out[:, k] |= v[:, k * per + j] << (bits * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def scheme(bits=4, symmetric=True, strategy="group", group_size=32, targets=("Linear",), fmt="pack-quantized", **extra):
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": group_size if strategy == "group" else None,
        "dynamic": False,
        **extra,
    }
    return {
        "targets": list(targets),
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": fmt,
    }


def quantization_config(groups: dict, ignore=("lm_head",), fmt="pack-quantized") -> dict:
    """As compressed-tensors' ``ModelCompressor.update_config`` writes it."""
    return {
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.1",
    }


def write_folder(path, config, qc, tensors) -> str:
    os.makedirs(path, exist_ok=True)
    data = config.to_dict()
    data["quantization_config"] = qc
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(data, fh)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    return str(path)


def build(config, module_schemes: dict[str, dict], seed=0, scale_dtype=torch.bfloat16, g_idx_modules=()):
    """A compressed-tensors folder with ``module_schemes`` ({linear: weights args}); the rest float.
    Returns (path, tensors, {linear: reference float32 weight})."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    tensors = {
        k: v.to(scale_dtype)
        for k, v in model.state_dict().items()
        if k.rpartition(".")[0] not in module_schemes and not (k == "lm_head.weight" and config.tie_word_embeddings)
    }
    weights = {}
    for name, args in module_schemes.items():
        lin = model.get_submodule(name)
        n_out, n_in = lin.out_features, lin.in_features
        bits, half = args["num_bits"], 2 ** (args["num_bits"] - 1)
        strategy = args["strategy"]
        gs = args["group_size"] if strategy == "group" else None
        groups = -(-n_in // gs) if strategy == "group" else 1
        q = torch.randint(-half, half, (n_out, n_in), generator=gen)  # signed values
        rows = 1 if strategy == "tensor" else n_out
        scale = (torch.rand(rows, groups, generator=gen) * 0.02 + 0.001).to(scale_dtype)
        zp = (
            torch.zeros(rows, groups, dtype=torch.int64)
            if args["symmetric"]
            else torch.randint(-half, half, (rows, groups), generator=gen)
        )
        g_idx = torch.arange(n_in) // (gs or n_in)
        if name in g_idx_modules:  # actorder "group" (older releases): a random assignment of features to groups
            p = torch.randperm(n_in, generator=gen)
            g_idx = torch.empty_like(g_idx)
            g_idx[p] = torch.arange(n_in) // gs
            tensors[f"{name}.weight_g_idx"] = g_idx.to(torch.int32)
        fmt = args.get("fmt", "pack-quantized")
        if fmt == "pack-quantized":
            tensors[f"{name}.weight_packed"] = ct_pack(q + half, bits)
            tensors[f"{name}.weight_shape"] = torch.tensor([n_out, n_in])
        else:  # naive-quantized: the signed values as int8
            tensors[f"{name}.weight"] = q.to(torch.int8)
        tensors[f"{name}.weight_scale"] = scale.reshape(1) if strategy == "tensor" else scale
        if not args["symmetric"]:
            if strategy == "tensor":
                tensors[f"{name}.weight_zero_point"] = zp.reshape(1).to(torch.int8)
            elif fmt == "pack-quantized":
                tensors[f"{name}.weight_zero_point"] = ct_pack(zp.t() + half, bits).t().contiguous()
            else:
                tensors[f"{name}.weight_zero_point"] = zp.to(torch.int8)
        # reference: w = (q - zp[g]) * scale[g] in float32
        s = scale.float().expand(n_out, groups)[:, g_idx]
        z = zp.float().expand(n_out, groups)[:, g_idx]
        weights[name] = (q.float() - z) * s
    return tensors, weights


def check(model, config, tensors, weights):
    for name, w in weights.items():
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear), name
        assert torch.equal(m.dequantize_weight(torch.float32), w), name
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, reference_model(config, tensors, weights)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    return ids, got


def args_for(bits=4, symmetric=True, strategy="group", group_size=32, fmt="pack-quantized"):
    return {"num_bits": bits, "symmetric": symmetric, "strategy": strategy, "group_size": group_size, "fmt": fmt}


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False), (2, True)])
def test_pack_quantized_group_is_exact(tmp_path, bits, symmetric):
    config = tiny_config()
    names = linear_names(config)
    tensors, weights = build(config, {n: args_for(bits, symmetric) for n in names}, seed=bits)
    path = write_folder(tmp_path / "ct", config, quantization_config({"group_0": scheme(bits, symmetric)}), tensors)
    assert detect_folder_format(path) == "compressed-tensors"
    model = load_folder(path)
    ids, logits = check(model, config, tensors, weights)
    for name in names:
        m = model.get_submodule(name)
        assert (m.bits, m.group_size, m.symmetric) == (bits, 32, symmetric)
        if symmetric:  # bit for bit: same words, bf16 scales kept
            assert torch.equal(m.weight, tensors[f"{name}.weight_packed"])
            assert m.weight_scale.dtype == torch.bfloat16
            assert m.storage_bits_per_weight == pytest.approx(bits + 16 / 32)
        else:  # integer zero points: uint8 zeros beside the bf16 scales, (q - z) * scale exactly
            assert m.zero_point == "integer" and m.weight_min is None and m.weight_zero.dtype == torch.uint8
            assert m.weight_scale.dtype == torch.bfloat16
            assert m.storage_bits_per_weight == pytest.approx(bits + (16 + 8) / 32)
    assert not isinstance(model.lm_head, QuantLinear)
    if bits == 4 and not symmetric:
        model.save_pretrained(tmp_path / "saved")
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, logits)


def test_mixed_schemes_targets_ignore_channel_tensor_naive_actorder_and_ragged_width(tmp_path):
    """Per-module schemes by exact name / regex / class precedence, ignore by regex; int8 channel,
    int8 tensor (naive-quantized), actorder g_idx, and in=80 (dense packing shorter than ours)."""
    config = tiny_config(intermediate=80, tie=True)
    names = linear_names(config)
    ignored = "model.layers.1.self_attn.o_proj"
    module_args = {}
    for n in names:
        if n == ignored:
            continue
        if n == "model.layers.0.mlp.down_proj":  # exact-name target beats the regex below
            module_args[n] = args_for(4, False, "group", 16)
        elif ".mlp." in n:
            module_args[n] = args_for(8, True, "channel")
        elif n.endswith("k_proj"):
            module_args[n] = args_for(8, False, "tensor", fmt="naive-quantized")
        else:
            module_args[n] = args_for(4, True, "group", 16)
    g_idx_modules = ("model.layers.0.self_attn.q_proj",)
    tensors, weights = build(config, module_args, seed=7, scale_dtype=torch.float16, g_idx_modules=g_idx_modules)
    groups = {
        "group_0": scheme(4, True, "group", 16, targets=["Linear"]),
        "group_1": scheme(8, True, "channel", targets=[r"re:.*mlp\..*"]),
        "group_2": scheme(4, False, "group", 16, targets=["model.layers.0.mlp.down_proj"]),
        "group_3": scheme(8, False, "tensor", targets=[r"re:.*k_proj$"], fmt="naive-quantized"),
    }
    groups["group_0"]["weights"]["actorder"] = "group"
    qc = quantization_config(groups, ignore=["lm_head", r"re:.*layers\.1\.self_attn\.o_proj"], fmt="mixed-precision")
    path = write_folder(tmp_path / "mixed", config, qc, tensors)
    model = load_folder(path)
    check(model, config, tensors, weights)
    assert not isinstance(model.get_submodule(ignored), QuantLinear)
    get = model.get_submodule
    ragged = get("model.layers.0.mlp.down_proj")  # in_features 80: 10 dense words repacked to our 12
    assert (ragged.bits, ragged.group_size, ragged.symmetric, ragged.in_features) == (4, 16, False, 80)
    down = get("model.layers.1.mlp.down_proj")  # in_features 80: repacked from 20 words to our 24
    assert (down.bits, down.group_size, down.symmetric, down.in_features) == (8, None, True, 80)
    assert (get("model.layers.0.self_attn.k_proj").bits, get("model.layers.0.self_attn.k_proj").group_size) == (8, None)
    assert get("model.layers.0.self_attn.q_proj").weight_perm is not None
    assert get("model.layers.1.self_attn.q_proj").weight_perm is None


# ----------------------------------------------------------------------------- compressed-tensors itself


def _compress_with_ct(path, config, weights_args: dict, dtype):
    """Quantize a tiny Llama with compressed-tensors' own API (min/max qparams) and save it the way
    llm-compressor does: compress_model, save_pretrained, update_config."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    args = QuantizationArgs(**weights_args)
    qconf = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]
    )
    apply_quantization_config(model, qconf, show_progress=False)
    for _, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.data
        wg = w.reshape(w.shape[0], -1, args.group_size) if args.strategy == "group" else w.unsqueeze(1)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        module.weight_scale.data.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return ct, args


@pytest.mark.parametrize(
    "weights_args,dtype",
    [
        ({"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}, torch.bfloat16),
        ({"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}, torch.bfloat16),
        ({"num_bits": 8, "symmetric": True, "strategy": "channel"}, torch.float32),
    ],
)
def test_folder_written_by_compressed_tensors_matches_its_decompression(tmp_path, weights_args, dtype):
    config = tiny_config()
    path = tmp_path / "ct_real"
    _, args = _compress_with_ct(path, config, weights_args, dtype)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    with open(path / "config.json") as fh:
        qc = json.load(fh)["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    model = load_folder(path)
    files = load_file(path / "model.safetensors")
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    decompressed = {}
    for name in linear_names(config):
        local = {k.rpartition(".")[2]: v for k, v in files.items() if k.rpartition(".")[0] == name}
        want = PackedQuantizationCompressor.decompress(local, ct_scheme)["weight"]  # (q - z) * s in the scale dtype
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear) and (m.bits, m.symmetric) == (args.num_bits, args.symmetric)
        ours = m.dequantize_weight(torch.float32)
        assert torch.equal(ours.to(want.dtype), want), name  # ours is exact; theirs is it rounded to the scale dtype
        decompressed[name] = want.float()
    if dtype == torch.float32:  # float32 scales: same numbers, so the same logits
        ref = reference_model(config, {k: v for k, v in files.items() if v.is_floating_point()}, decompressed)
        ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def _simple_folder(tmp_path, qc_groups=None, fmt="pack-quantized", mutate=None, name="f"):
    config = tiny_config()
    names = linear_names(config)
    tensors, _ = build(config, {n: args_for(4, True) for n in names})
    if mutate:
        mutate(tensors)
    return write_folder(
        tmp_path / name, config, quantization_config(qc_groups or {"group_0": scheme()}, fmt=fmt), tensors
    )


def test_unsupported_formats_and_schemes_name_them(tmp_path):
    path = _simple_folder(
        tmp_path, {"group_0": scheme(fmt="float-quantized", type="float", bits=8)}, fmt="float-quantized", name="fp8"
    )
    with pytest.raises(FormatError, match="format 'float-quantized' is not supported; supported: pack-quantized"):
        load_folder(path)
    acts = scheme()
    acts["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    path = _simple_folder(tmp_path, {"group_0": acts}, name="w4a8")
    with pytest.raises(FormatError, match="input_activations quantization is not supported"):
        load_folder(path)
    path = _simple_folder(tmp_path, {"group_0": scheme(bits=3)}, name="int3")
    with pytest.raises(FormatError, match=r"pack-quantized num_bits=3 is not supported; supported: 2, 4, 8"):
        load_folder(path)
    path = _simple_folder(tmp_path, {"group_0": scheme(fmt="marlin-24")}, fmt="marlin-24", name="marlin")
    with pytest.raises(FormatError, match="'marlin-24'"):
        load_folder(path)


def test_mismatched_shape_truncated_file_and_stray_tensors(tmp_path):
    def bad_shape(t):
        t["model.layers.1.mlp.down_proj.weight_packed"] = t["model.layers.1.mlp.down_proj.weight_packed"][:, :-1]

    path = _simple_folder(tmp_path, mutate=bad_shape, name="shape")
    with pytest.raises(
        FormatError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_packed.*model\.safetensors.*shape"
    ):
        load_folder(path)

    path = _simple_folder(tmp_path, name="trunc")
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as fh:
        fh.truncate(os.path.getsize(file) // 2)
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated"):
        load_folder(path)

    def quantized_embedding(t):
        t["model.embed_tokens.weight_packed"] = torch.zeros(128, 8, dtype=torch.int32)

    path = _simple_folder(tmp_path, mutate=quantized_embedding, name="stray")
    with pytest.raises(FormatError, match=r"model\.embed_tokens\.weight_packed.*no nn\.Linear"):
        load_folder(path)

    path = _simple_folder(tmp_path, {"group_0": scheme(symmetric=False)}, name="nozp")
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight_zero_point.*missing"):
        load_folder(path)
