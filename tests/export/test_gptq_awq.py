"""GPTQ v1 and AWQ GEMM exports: round trips through our readers, the layouts decoded independently
(AutoGPTQ's v1 formula, AutoAWQ's ``dequantize_gemm``), refusals and lossy conversions.

Models are tiny random Llamas whose linears are our `QuantLinear`: quantized by the plugin (symmetric RTN)
or built here from random codes, scales and zero points (asymmetric, act-order, mixed widths), so that
every case of the layouts is reached in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

import hf_efficiency  # noqa: F401  (registers our quantizer)
from hf_efficiency.export import ExportError, export_model
from hf_efficiency.formats import load_compressed
from hf_efficiency.quant.core.packing import pack
from hf_efficiency.quant.core.scheme import QuantizedWeight, num_groups
from hf_efficiency.quant.modules.linear import QuantLinear

HAS_INT_ZERO = "zero" in QuantizedWeight.__dataclass_fields__  # integer zero points in QuantLinear
ZERO_FORMS = ["integer", "float-steps"] if HAS_INT_ZERO else ["float-steps"]
IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- models


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def quantized_weight(
    linear: nn.Linear,
    gen: torch.Generator,
    bits: int = 4,
    group_size: int | None = 32,
    sym: bool = False,
    act_order: bool = False,
    zero_form: str = "integer",
    zeros: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Random codes, float16 scales and zero points in ``[1, 2**bits - 1]`` (or ``zeros``); asymmetric
    grids as integer zero points or as float minima that are whole steps (``-zero * scale`` in float32)."""
    n_out, n_in = linear.out_features, linear.in_features
    groups = num_groups(n_in, group_size)
    codes = torch.randint(0, 2**bits, (n_out, n_in), generator=gen)
    scale = (torch.rand(n_out, groups, generator=gen) * 0.02 + 0.002).half()
    perm = torch.randperm(n_in, generator=gen).to(torch.int32) if act_order else None
    packed = pack(codes, bits)
    if sym:
        return QuantizedWeight(packed, scale, None, bits, group_size, n_in, perm=perm)
    if zeros is None:
        zeros = torch.randint(1, 2**bits, (n_out, groups), generator=gen)
    if zero_form == "integer":
        return QuantizedWeight(packed, scale, None, bits, group_size, n_in, perm=perm, zero=zeros.to(torch.uint8))
    s32 = scale.float()
    return QuantizedWeight(packed, s32, -(zeros.float() * s32), bits, group_size, n_in, perm=perm)


def built_model(spec, seed: int = 0, **llama) -> nn.Module:
    """A tiny Llama (float32, untied head) whose linears ``spec(name)`` describes are replaced by `QuantLinear`
    (``spec`` returns the keywords of `quantized_weight`, or None to keep the linear in float)."""
    model = make_tiny_llama(seed=seed, tie=False, **llama)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in linear_names(model):
        kwargs = spec(name)
        if kwargs is None:
            continue
        linear = model.get_submodule(name)
        q = quantized_weight(linear, gen, **kwargs)
        sym = kwargs.get("sym", False)
        model.set_submodule(name, QuantLinear.from_quantized(linear, q, symmetric=sym))
    return model


@pytest.fixture(scope="module")
def rtn_model(tmp_path_factory):
    """A tiny Llama quantized by the plugin: symmetric RTN int4, group 32."""
    src = tmp_path_factory.mktemp("float")
    make_tiny_llama(seed=3, tie=False).save_pretrained(src)
    cfg = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}}
    return AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_round_trip(model: nn.Module, folder, exact_logits: bool = True) -> nn.Module:
    """Our reader gives back bit-identical weights (and logits) for every quantized linear."""
    back = load_compressed(folder, dtype=torch.float32)
    for name, module in quantized_modules(model).items():
        loaded = back.get_submodule(name)
        assert isinstance(loaded, QuantLinear), name
        assert torch.equal(loaded.dequantize_weight(), module.dequantize_weight()), name
        if module.bias is not None:
            assert torch.equal(loaded.bias, module.bias), name
    for name in linear_names(model):
        if not isinstance(model.get_submodule(name), QuantLinear):
            assert not isinstance(back.get_submodule(name), QuantLinear), name
    if exact_logits:
        assert torch.equal(logits(back), logits(model))
    else:
        torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=1e-4)
    return back


def folder_config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- independent decoders


def bit_stream(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing read back: int32 ``[W, cols]`` -> ``[n, cols]``, code ``i`` at bits ``[bits*i,
    bits*(i+1))`` of the column's little-endian stream (3-bit codes straddle words)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    rows = []
    for i in range(n):
        word, shift = divmod(bits * i, 32)
        v = w[word] >> shift
        if shift + bits > 32:
            v = v | (w[word + 1] << (32 - shift))
        rows.append(v & (2**bits - 1))
    return torch.stack(rows)


def gptq_v1_weight(tensors: dict[str, torch.Tensor], name: str, bits: int) -> torch.Tensor:
    """AutoGPTQ v1: ``w[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1))``, ``g = g_idx[i]``."""
    scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"].long()
    n_in, n_out = g_idx.numel(), scales.shape[1]
    q = bit_stream(tensors[f"{name}.qweight"], n_in, bits)  # [in, out]
    zeros = bit_stream(tensors[f"{name}.qzeros"].t(), n_out, bits).t() + 1  # [G, out]
    return (scales.float()[g_idx] * (q - zeros[g_idx]).float()).t()


def awq_gemm_weight(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> torch.Tensor:
    """AutoAWQ's ``dequantize_gemm`` (``awq.utils.packing_utils``) when autoawq imports, else the same formula
    written out: nibble ``k`` of word ``c`` is output ``8c + [0, 2, 4, 6, 1, 3, 5, 7][k]``. The scales go in
    as float32: AutoAWQ's float16 product ``(q - z) * scale`` rounds (it needs up to 15 significant bits)."""
    qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
    if importlib.util.find_spec("awq") is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from awq.utils.packing_utils import dequantize_gemm
        return dequantize_gemm(qweight, qzeros, scales.float(), 4, group_size).t()
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words):
        out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
        for k in range(8):
            out[:, order[k] :: 8] = (words.to(torch.int64) >> (4 * k)) & 0xF
        return out

    q, z = unpack(qweight), unpack(qzeros).repeat_interleave(group_size, 0)
    return ((q - z).float() * scales.float().repeat_interleave(group_size, 0)).t()


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (shards included)."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


# ----------------------------------------------------------------------------- GPTQ


def test_gptq_rtn_model_round_trip_layout_config_and_tokenizer(rtn_model, tmp_path, byte_tokenizer):
    folder = tmp_path / "gptq"
    report = export_model(rtn_model, folder, "gptq", tokenizer=byte_tokenizer)
    assert report.exact and len(report.quantized) == 14 and report.float_modules == ["lm_head"]
    assert set(report.quantized.values()) == {"int4 g32 sym (GPTQ v1)"}
    assert "vLLM (CUDA and CPU)" in report.engines
    assert {"model.safetensors", "config.json", "quantize_config.json", "tokenizer.json"} <= set(report.files)
    config = folder_config(folder)
    qc = config["quantization_config"]
    assert qc == json.loads((folder / "quantize_config.json").read_text())
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "desc_act": False,
        "checkpoint_format": "gptq",
    }
    assert qc["lm_head"] is False and "dynamic" not in qc and qc["pack_dtype"] == "int32"
    assert config["dtype"] == "float16" and any("declares dtype float16" in n for n in report.notes)
    GPTQConfig.from_dict(dict(qc))  # transformers parses it

    tensors = folder_tensors(folder)
    for name, module in quantized_modules(rtn_model).items():
        n_in, n_out = module.in_features, module.out_features
        assert (
            tensors[f"{name}.qweight"].shape == (n_in // 8, n_out) and tensors[f"{name}.qweight"].dtype == torch.int32
        )
        assert tensors[f"{name}.qzeros"].shape == (n_in // 32, n_out // 8)
        assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.g_idx"].dtype == torch.int32
        assert torch.equal(gptq_v1_weight(tensors, name, 4), module.dequantize_weight()), name
        # symmetric v1: every stored zero is 8 - 1
        assert bool((tensors[f"{name}.qzeros"] == 0x77777777).all())
    assert torch.equal(tensors["model.embed_tokens.weight"], rtn_model.model.embed_tokens.weight)  # float32 kept
    assert tensors["lm_head.weight"].dtype == torch.float32
    assert_round_trip(rtn_model, folder)


@pytest.mark.parametrize("zero_form", ZERO_FORMS)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (2, None), (8, 64)])
def test_gptq_asymmetric_widths_and_groups_are_exact(tmp_path, zero_form, bits, group_size):
    model = built_model(lambda n: {"bits": bits, "group_size": group_size, "zero_form": zero_form})
    folder = tmp_path / "gptq"
    report = export_model(model, folder, "gptq", progress=False)
    assert report.exact
    group = "channel" if group_size is None else f"g{group_size}"
    assert set(report.quantized.values()) == {f"int{bits} {group} asym (GPTQ v1)"}
    qc = folder_config(folder)["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, group_size or -1, False, False)
    assert any("vLLM's CPU build refuses this folder" in n for n in report.notes)
    tensors = folder_tensors(folder)
    for name, module in quantized_modules(model).items():
        assert tensors[f"{name}.qweight"].shape == (module.in_features * bits // 32, module.out_features)
        assert torch.equal(gptq_v1_weight(tensors, name, bits), module.dequantize_weight()), name
    assert_round_trip(model, folder)


def test_gptq_act_order_keeps_input_order_and_g_idx(tmp_path):
    model = built_model(lambda n: {"bits": 4, "group_size": 32, "act_order": True, "sym": "mlp" in n})
    folder = tmp_path / "gptq"
    report = export_model(model, folder, "gptq", progress=False)
    assert report.exact
    assert report.quantized["model.layers.0.mlp.up_proj"] == "int4 g32 sym act-order (GPTQ v1)"
    qc = folder_config(folder)["quantization_config"]
    assert qc["desc_act"] is True
    tensors = folder_tensors(folder)
    for name, module in quantized_modules(model).items():
        perm = module.weight_perm.long()
        want = torch.empty_like(perm).index_copy_(0, perm, torch.arange(module.in_features) // 32)
        assert torch.equal(tensors[f"{name}.g_idx"].long(), want), name  # the group of each input feature
        assert torch.equal(gptq_v1_weight(tensors, name, 4), module.dequantize_weight()), name
    # the reader sorts each group's columns by input index, ours are in random order: same weights, and
    # logits equal up to the order of the float32 sums
    assert_round_trip(model, folder, exact_logits=False)


def test_gptq_mixed_formats_use_dynamic_overrides(tmp_path):
    def spec(name):
        if name == "model.layers.1.self_attn.o_proj":
            return None  # kept in float
        if name.startswith("model.layers.1.mlp"):
            return {"bits": 8, "group_size": None, "sym": True}
        return {"bits": 4, "group_size": 32, "sym": True}

    model = built_model(spec)
    folder = tmp_path / "gptq"
    report = export_model(model, folder, "gptq", progress=False)
    qc = folder_config(folder)["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, True)
    assert qc["dynamic"] == {
        **{
            rf"+:model\.layers\.1\.mlp\.{p}$": {"bits": 8, "group_size": -1, "sym": True}
            for p in ("gate_proj", "up_proj", "down_proj")
        },
        r"-:model\.layers\.1\.self_attn\.o_proj$": {},
    }
    assert report.float_modules == ["model.layers.1.self_attn.o_proj", "lm_head"]
    assert any("dynamic" in n for n in report.notes)
    back = assert_round_trip(model, folder)
    assert back.get_submodule("model.layers.1.mlp.up_proj").bits == 8


def test_gptq_bits_option_widens_exactly_and_converts_wider(tmp_path):
    model = built_model(lambda n: {"bits": 8 if n.endswith("down_proj") else 3, "group_size": 32, "sym": True})
    with pytest.raises(
        ExportError, match=r"model\.layers\.0\.mlp\.down_proj: cannot be written to GPTQ exactly: 8-bit"
    ):
        export_model(model, tmp_path / "refused", "gptq", bits=4, progress=False)
    assert not (tmp_path / "refused").exists()  # nothing written before every module is checked
    report = export_model(model, tmp_path / "gptq", "gptq", bits=4, lossy=True, progress=False)
    assert set(report.changes) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "vLLM (CUDA and CPU)" in report.engines  # every module is 4-bit symmetric now
    back = load_compressed(tmp_path / "gptq", dtype=torch.float32)
    for name, module in quantized_modules(model).items():
        loaded = back.get_submodule(name)
        assert loaded.bits == 4
        if name in report.changes:  # the change reported is the change made
            ref = module.dequantize_weight()
            measured = float((loaded.dequantize_weight() - ref).abs().max() / ref.abs().max())
            assert measured == pytest.approx(report.changes[name].max_change, rel=1e-6) and 0 < measured < 0.1
        else:  # 3-bit widened to 4: exact
            assert torch.equal(loaded.dequantize_weight(), module.dequantize_weight())


@pytest.mark.parametrize("zero_form", ZERO_FORMS)
def test_gptq_v1_zero_point_0_is_refused_or_moved_to_1(tmp_path, zero_form):
    def spec(name):
        if name != "model.layers.0.self_attn.q_proj":
            return {"bits": 4, "group_size": 32, "sym": True}
        zeros = torch.full((64, 2), 5)
        zeros[:3, 0] = 0  # three groups whose weights are all >= 0
        return {"bits": 4, "group_size": 32, "zeros": zeros, "zero_form": zero_form}

    model = built_model(spec)
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(
        ExportError, match=rf"{name}: cannot be written to GPTQ exactly: 3 of its 128 groups have zero point 0"
    ):
        export_model(model, tmp_path / "refused", "gptq", progress=False)
    report = export_model(model, tmp_path / "gptq", "gptq", lossy=True, progress=False)
    assert list(report.changes) == [name] and "zero point 0" in report.changes[name].reasons[0]
    tensors = folder_tensors(tmp_path / "gptq")
    want = model.get_submodule(name).dequantize_weight()
    got = gptq_v1_weight(tensors, name, 4)
    assert torch.equal(got[3:], want[3:]) and torch.equal(got[:3, 32:], want[:3, 32:])  # only those groups move
    change = float((got - want).abs().max() / want.abs().max())
    assert change == pytest.approx(report.changes[name].max_change, rel=1e-6) and change > 0
    back = load_compressed(tmp_path / "gptq", dtype=torch.float32)
    assert torch.equal(back.get_submodule(name).dequantize_weight(), got)


def test_gptq_refusals_name_the_module_and_reason(rtn_model, tmp_path):
    model = built_model(lambda n: {"bits": 4, "group_size": 32}, intermediate_size=96 + 8)
    with pytest.raises(
        ExportError,
        match=r"mlp\.gate_proj: cannot be written to GPTQ: in_features \(64\) and out_features \(104\) must be multiples of 32",
    ):
        export_model(model, tmp_path / "x", "gptq", lossy=True, progress=False)
    with pytest.raises(ValueError, match=r"unknown gptq export option\(s\) 'group'; allowed keys: bits, progress"):
        export_model(rtn_model, tmp_path / "x", "gptq", group=32)
    with pytest.raises(ValueError, match=r"bits=5 is not allowed; allowed values: None, 2, 3, 4, 8"):
        export_model(rtn_model, tmp_path / "x", "gptq", bits=5)


def test_float_minima_and_outliers_are_refused_then_converted(tmp_path):
    """Asymmetric RTN with float minima (not whole steps) and outlier weights: refused, then converted."""
    src = tmp_path / "float"
    make_tiny_llama(seed=5, tie=False).save_pretrained(src)
    cfg = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "outliers": 0.02}}
    model = AutoModelForCausalLM.from_pretrained(src, efficiency_config=cfg)
    for fmt in ("gptq", "awq"):
        with pytest.raises(
            ExportError, match=r"float minima are not whole steps of the scale.*outlier weights per row"
        ):
            export_model(model, tmp_path / fmt, fmt, progress=False)
        report = export_model(model, tmp_path / fmt, fmt, lossy=True, progress=False)
        assert not report.exact and len(report.changes) == 14
        assert all(0 < c.rms_change < 0.2 for c in report.changes.values())
        assert "converted" in report.summary()
        back = load_compressed(tmp_path / fmt, dtype=torch.float32)
        name = "model.layers.1.mlp.down_proj"
        ref = model.get_submodule(name).dequantize_weight()
        measured = float((back.get_submodule(name).dequantize_weight() - ref).abs().max() / ref.abs().max())
        assert measured == pytest.approx(report.changes[name].max_change, rel=1e-6)


# ----------------------------------------------------------------------------- AWQ


def test_awq_rtn_model_round_trip_layout_and_config(rtn_model, tmp_path):
    folder = tmp_path / "awq"
    report = export_model(rtn_model, folder, "awq", dtype="bfloat16", progress=False)
    assert report.exact and set(report.quantized.values()) == {"int4 g32 sym (AWQ GEMM)"}
    config = folder_config(folder)
    qc = config["quantization_config"]
    assert qc == {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": 4,
        "w_bit": 4,
        "group_size": 32,
        "q_group_size": 32,
        "modules_to_not_convert": ["lm_head"],
    }
    parsed = AwqConfig.from_dict(dict(qc))  # transformers parses it
    assert (parsed.bits, parsed.group_size, parsed.zero_point) == (4, 32, True)
    assert config["dtype"] == "bfloat16" and any("serve with dtype='float16'" in n for n in report.notes)
    tensors = folder_tensors(folder)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    for name, module in quantized_modules(rtn_model).items():
        n_in, n_out = module.in_features, module.out_features
        assert tensors[f"{name}.qweight"].shape == (n_in, n_out // 8)
        assert tensors[f"{name}.qzeros"].shape == (n_in // 32, n_out // 8)
        assert tensors[f"{name}.scales"].shape == (n_in // 32, n_out)
        assert torch.equal(awq_gemm_weight(tensors, name, 32), module.dequantize_weight()), name
        assert bool((tensors[f"{name}.qzeros"] == (0x88888888 - 2**32)).all())  # symmetric: zero 8
    back = load_compressed(folder, dtype=torch.float32)
    for name, module in quantized_modules(rtn_model).items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(), module.dequantize_weight())


@pytest.mark.parametrize("zero_form", ZERO_FORMS)
def test_awq_asymmetric_narrow_widths_widen_exactly(tmp_path, zero_form):
    def spec(name):
        if "self_attn" in name:
            return {"bits": 3, "group_size": 32, "zero_form": zero_form}
        return {"bits": 2, "group_size": 32, "sym": True}

    model = built_model(spec)
    folder = tmp_path / "awq"
    report = export_model(model, folder, "awq", progress=False)
    assert report.exact
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "int4 g32 asym (AWQ GEMM)"
    assert report.quantized["model.layers.0.mlp.up_proj"] == "int4 g32 sym (AWQ GEMM)"
    tensors = folder_tensors(folder)
    for name, module in quantized_modules(model).items():
        assert torch.equal(awq_gemm_weight(tensors, name, 32), module.dequantize_weight()), name
    back = assert_round_trip(model, folder)
    assert all(m.bits == 4 for m in quantized_modules(back).values())


def test_awq_per_channel_sharded_and_act_order_undone(tmp_path):
    """Per channel (AWQ group_size -1); an act-order permutation of a single group is undone exactly."""
    model = built_model(lambda n: {"bits": 4, "group_size": None, "act_order": "mlp" in n})
    folder = tmp_path / "awq"
    report = export_model(model, folder, "awq", max_shard_size=40_000, progress=False)
    assert report.exact and "model.safetensors.index.json" in report.files
    qc = folder_config(folder)["quantization_config"]
    assert qc["group_size"] == qc["q_group_size"] == -1
    tensors = folder_tensors(folder)
    for name, module in quantized_modules(model).items():
        assert tensors[f"{name}.scales"].shape == (1, module.out_features)
        assert torch.equal(awq_gemm_weight(tensors, name, module.in_features), module.dequantize_weight()), name
    assert_round_trip(model, folder, exact_logits=False)  # our act-order modules sum in their column order


def test_awq_refusals_and_lossy_conversions(tmp_path):
    q_proj = "model.layers.0.self_attn.q_proj"
    down = "model.layers.1.mlp.down_proj"
    cases = {
        "act-order": ({"act_order": True}, r"AWQ exactly: AWQ cannot store an act-order column permutation"),
        "8-bit": ({"bits": 8}, r"AWQ exactly: 8-bit codes do not fit the AWQ widths \[4\]"),
        "group": ({"group_size": 64}, r"AWQ exactly: its group size 64 differs from the model's group size 32"),
    }
    for case, (kwargs, message) in cases.items():
        model = built_model(lambda n: {"bits": 4, "group_size": 32, **(kwargs if n in (q_proj, down) else {})})
        with pytest.raises(ExportError, match=rf"{q_proj}: cannot be written to {message}"):
            export_model(model, tmp_path / case, "awq", progress=False)
        assert not (tmp_path / case).exists()
        report = export_model(model, tmp_path / case, "awq", lossy=True, progress=False)
        assert set(report.changes) == {q_proj, down}, case
        back = load_compressed(tmp_path / case, dtype=torch.float32)
        loaded = back.get_submodule(q_proj)
        assert (loaded.bits, loaded.group_size, loaded.weight_perm) == (4, 32, None), case
        ref = model.get_submodule(q_proj).dequantize_weight()
        measured = float((loaded.dequantize_weight() - ref).abs().max() / ref.abs().max())
        assert measured == pytest.approx(report.changes[q_proj].max_change, rel=1e-6), case
        # the other modules are untouched
        other = "model.layers.0.mlp.up_proj"
        assert torch.equal(
            back.get_submodule(other).dequantize_weight(), model.get_submodule(other).dequantize_weight()
        )

    odd = built_model(lambda n: {"bits": 4, "group_size": 32}, intermediate_size=100)
    with pytest.raises(
        ExportError, match=r"gate_proj: cannot be written to AWQ: out_features \(100\) must be a multiple of 8"
    ):
        export_model(odd, tmp_path / "odd", "awq", lossy=True, progress=False)
    # a group size that does not divide the row is written with the largest block dividing both (16 here),
    # each scale and zero point repeated: exact
    partial = built_model(lambda n: {"bits": 4, "group_size": 48})
    report = export_model(partial, tmp_path / "partial", "awq", progress=False)
    assert report.exact and {"int4 g16 asym (AWQ GEMM)"} == set(report.quantized.values())
    back = load_compressed(tmp_path / "partial", dtype=torch.float32)
    for name in (q_proj, down):
        assert torch.equal(
            back.get_submodule(name).dequantize_weight(), partial.get_submodule(name).dequantize_weight()
        )
    ragged = built_model(lambda n: {"bits": 4, "group_size": 40})  # shares only 8 with 64: no block of 16
    with pytest.raises(
        ExportError,
        match=r"q_proj: cannot be written to AWQ: the model's group size 40 does not divide in_features \(64\)",
    ):
        export_model(ragged, tmp_path / "ragged", "awq", lossy=True, progress=False)

    head = built_model(lambda n: {"bits": 4, "group_size": 32})
    linear = head.lm_head
    q = quantized_weight(linear, torch.Generator().manual_seed(0), sym=True)
    head.lm_head = QuantLinear.from_quantized(linear, q, symmetric=True)
    with pytest.raises(ExportError, match=r"lm_head: cannot be written to AWQ: it is the output embedding"):
        export_model(head, tmp_path / "head", "awq", progress=False)
    with pytest.raises(
        ExportError, match=r"lm_head: cannot be written to GPTQ: in_features \(64\) and out_features \(257\)"
    ):
        export_model(head, tmp_path / "head", "gptq", progress=False)


# ----------------------------------------------------------------------------- transformers


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is not None, reason="gptqmodel installed: kernels may load")
def test_transformers_needs_gptqmodel_for_both_folders(rtn_model, tmp_path):
    """transformers 5.x loads GPTQ and AWQ folders only through gptqmodel (optimum's GPTQ quantizer needs it
    too): without it a plain from_pretrained fails before reading weights; our reader loads both."""
    for fmt in ("gptq", "awq"):
        export_model(rtn_model, tmp_path / fmt, fmt, progress=False)
        with pytest.raises((ImportError, RuntimeError, NameError)):
            AutoModelForCausalLM.from_pretrained(tmp_path / fmt)
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / fmt, efficiency_config={"keep_compressed": True}, dtype=torch.float32
        )
        assert torch.equal(logits(model), logits(rtn_model))
