"""compressed-tensors export: the folder written holds exactly our weights, as judged by three readers.

* compressed-tensors' own ``ModelCompressor`` (0.20.1: ``apply_quantization_config`` + ``compress_model``
  build the compressed module layout, our tensors load into it strictly, ``decompress_model`` runs its
  packers backwards). It computes ``(q - z) * s`` in the dtype of the scale parameters: in float32 the
  product of a small integer and a 16-bit scale is exact, so it equals our float32 de-quantized weight bit
  for bit; in float16 it is the correctly rounded product, i.e. our float32 weight cast to float16 (also
  compared bit for bit).
* transformers' compressed-tensors loader (plain ``from_pretrained``; ``CompressedTensorsHfQuantizer``
  de-quantizes on the first forward): our weights bit for bit and logits equal to ours (relative error
  <= 1e-5 in float32); asymmetric folders only through ``dequantize=True`` (see `load_with_transformers`).
* our own reader (`load_compressed`): the same de-quantized weights and logits.

Models are tiny random Llamas quantized with hf-efficiency (round to nearest through ``from_pretrained``,
or `QuantLinear.from_linear` module by module for mixed schemes); act-order, ragged-group and static W8A8
modules are built from them (`with_perm`, `ragged_module`, `as_static`).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_efficiency  # noqa: F401  (registers our quantizer: it must not take over compressed-tensors)
from hf_efficiency.export import ExportError, export_model
from hf_efficiency.export.compressed_tensors import pack_dense, write_compressed_tensors
from hf_efficiency.formats import load_compressed
from hf_efficiency.formats.common import FormatError
from hf_efficiency.quant.core.packing import pack, unpack
from hf_efficiency.quant.core.scheme import QuantizedWeight
from hf_efficiency.quant.modules.linear import QuantLinear

pytest.importorskip("compressed_tensors")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
Q_PROJ = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    make_tiny_llama(seed=3, tie=False).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def quantize(path, **quantization):
    spec = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, **quantization}
    return AutoModelForCausalLM.from_pretrained(path, efficiency_config={"quantization": spec}).eval()


def quantized(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def replace_module(model, name, build):
    """Swap module ``name`` for ``build(old)``."""
    model.set_submodule(name, build(model.get_submodule(name)))


def with_perm(module: QuantLinear, perm: torch.Tensor, keep_weight: bool = True) -> QuantLinear:
    """``module`` (no act-order) storing its columns in the order ``perm`` (stored column ``j`` holds feature
    ``perm[j]``). ``keep_weight``: the groups' scales follow (same weight; needs whole groups per stored
    group); else they stay (another weight, for a permutation that mixes groups)."""
    n, bits, size = module.in_features, module.bits, module.group_size or module.in_features
    codes = unpack(module.weight, bits, n)
    scale, zero = module.weight_scale, getattr(module, "weight_zero", None)
    if keep_weight:
        order = perm[::size].long() // size
        scale = scale.index_select(1, order)
        zero = None if zero is None else zero.index_select(1, order)
    q = QuantizedWeight(
        pack(codes[:, perm.long()], bits), scale, None, bits, module.group_size, n, perm=perm, zero=zero
    )
    return QuantLinear.from_quantized(nn.Linear(n, module.out_features, bias=False), q, symmetric=module.symmetric)


def as_static(module: QuantLinear, input_scale: float) -> QuantLinear:
    """A static-activation (``act_mode="static"``) copy of a dynamic W8A8 module."""
    new = QuantLinear(
        module.in_features, module.out_features, False, bits=8, group_size=None, symmetric=True,
        scale_dtype=module.weight_scale.dtype, act_mode="static",
    )  # fmt: skip
    new.load_quantized(QuantizedWeight(module.weight, module.weight_scale, None, 8, None, module.in_features))
    new.set_input_scale(input_scale)
    return new


def ct_decompressed(folder, dtype: torch.dtype) -> LlamaForCausalLM:
    """compressed-tensors' own decompression of ``folder`` (what transformers' loader does, step by step)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import CompressedTensorsConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(folder)).to(dtype)
    apply_quantization_config(model, compressor.quantization_config, show_progress=False)
    compressor.compress_model(model)  # the compressed layout (weight_packed, weight_zero_point, ...)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    compressor.decompress_model(model)
    return model


def check_compressed_tensors(folder, ours: dict[str, QuantLinear]) -> None:
    """compressed-tensors decompresses every quantized linear to our weight (see the module docstring)."""
    for dtype in (torch.float32, torch.float16):
        model = ct_decompressed(folder, dtype)
        for name, module in ours.items():
            want = module.dequantize_weight(torch.float32)
            got = model.get_submodule(name).weight
            assert got.dtype == dtype and torch.equal(got, want.to(dtype)), (name, dtype)


def load_with_transformers(folder) -> tuple[nn.Module | None, torch.dtype | None]:
    """Plain ``from_pretrained`` of an export (transformers' compressed-tensors quantizer, not ours) and the
    precision its weights come out in.

    Symmetric and W8A8 folders load on the default path (compressed layout, de-quantized in float32 on the
    first forward): our weights exactly. Asymmetric pack-quantized folders do not load there with
    transformers 5.x and compressed-tensors 0.20.1, whoever wrote them: the compressed layout transformers
    builds on the meta device keeps ``weight_zero_point`` unpacked (``[out, G]`` instead of
    ``[out*b/32, G]``), a size mismatch (compressed-tensors' own folders fail the same way, see
    `test_folder_written_by_compressed_tensors_reexports_byte_for_byte`). ``dequantize=True`` loads a
    single-scheme folder by decompressing the checkpoint tensors as stored, i.e. in their float16 scale
    dtype (our weights rounded to float16); with several schemes it fails (it applies one scheme to every
    module): ``(None, None)``.
    """
    from transformers import CompressedTensorsConfig

    groups = config_of(folder)["config_groups"].values()
    if all(g["weights"]["symmetric"] or g["format"] != "pack-quantized" for g in groups):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(model.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
        assert model.config.quantization_config.quant_method == "compressed-tensors"
        return model, torch.float32
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if len(groups) > 1:
        return None, None
    with warnings.catch_warnings():  # "loading attributes (dequantize) will be overwritten": what we ask
        warnings.simplefilter("ignore", UserWarning)
        dense = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=dense)
    return model.eval(), torch.float16


def check_transformers(folder, ours: dict[str, QuantLinear]) -> torch.Tensor | None:
    """transformers' logits for an export, after checking that every quantized linear it computes with is
    our weight (in the precision `load_with_transformers` gives)."""
    loaded, precision = load_with_transformers(folder)
    if loaded is None:
        return None
    got = logits(loaded)  # the first forward de-quantizes
    for name, module in ours.items():
        want = module.dequantize_weight(torch.float32).to(precision).float()
        assert torch.equal(loaded.get_submodule(name).weight, want), name
    return got


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def check_config_is_compressed_tensors(qc: dict) -> None:
    """Our quantization_config is what compressed-tensors itself parses and writes back (a fixed point)."""
    from compressed_tensors.quantization import QuantizationScheme

    for group in qc["config_groups"].values():
        parsed = QuantizationScheme.model_validate(group).model_dump()
        assert parsed == group, (parsed, group)


# ----------------------------------------------------------------------------- weight-only (pack-quantized)

CASES = {
    "int4-g32-sym": {},
    "int4-g32-asym": {"symmetric": False, "zero_point": "integer"},
    "int4-channel-sym": {"group_size": None},
    "int4-channel-asym": {"group_size": None, "symmetric": False, "zero_point": "integer"},
    "int8-g32-sym": {"bits": 8},
    "int8-channel-asym": {"bits": 8, "group_size": None, "symmetric": False, "zero_point": "integer"},
    "int2-g32-sym": {"bits": 2},
    "int3-g64-asym": {"bits": 3, "group_size": 64, "symmetric": False, "zero_point": "integer"},
    "int4-g32-asym-act-order": {"symmetric": False, "zero_point": "integer"},
    "int4-channel-sym-act-order": {"group_size": None},
}


@pytest.mark.parametrize("case", list(CASES))
def test_weight_only_export_is_exact_for_compressed_tensors_transformers_and_our_reader(fp_dir, tmp_path, case):
    model = quantize(fp_dir, **CASES[case])
    if case.endswith("act-order"):  # stored columns permuted, every stored group a whole input group
        gen = torch.Generator().manual_seed(1)
        for name, module in quantized(model).items():
            size = module.group_size or module.in_features
            blocks = torch.randperm(module.in_features // size, generator=gen)
            perm = torch.cat([b * size + torch.randperm(size, generator=gen) for b in blocks.tolist()]).int()
            before = module.dequantize_weight(torch.float32)
            replace_module(model, name, lambda m, p=perm: with_perm(m, p))
            assert torch.equal(model.get_submodule(name).dequantize_weight(torch.float32), before)
    ours = quantized(model)
    want = logits(model)
    out = tmp_path / "ct"
    report = export_model(model, out, "compressed-tensors", progress=False)

    bits, size = ours[Q_PROJ].bits, ours[Q_PROJ].group_size
    symmetric = ours[Q_PROJ].symmetric
    written = max(bits, 4)
    assert report.exact and report.float_modules == ["lm_head"] and len(report.quantized) == 14
    assert report.quantized[Q_PROJ].startswith(
        f"int{written} {'channel' if size is None else f'g{size}'} {'sym' if symmetric else 'asym'}"
    )
    assert ("widened from int" in report.quantized[Q_PROJ]) == (bits < 4)
    assert report.engines == ["vLLM", "SGLang", "transformers (compressed-tensors)"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(report.files)
    qc = config_of(out)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == {
        "num_bits": written,
        "type": "int",
        "symmetric": symmetric,
        "group_size": size,
        "strategy": "channel" if size is None else "group",
        "dynamic": False,
    }
    check_config_is_compressed_tensors(qc)
    files = load_file(out / "model.safetensors")
    n_out, n_in = ours[DOWN].out_features, ours[DOWN].in_features
    groups = 1 if size is None else n_in // size
    assert files[f"{DOWN}.weight_packed"].shape == (n_out, n_in * written // 32)
    assert files[f"{DOWN}.weight_scale"].shape == (n_out, groups)
    assert files[f"{DOWN}.weight_scale"].dtype == torch.float16
    assert files[f"{DOWN}.weight_shape"].tolist() == [n_out, n_in]
    assert (f"{DOWN}.weight_zero_point" in files) == (not symmetric)
    if not symmetric:
        assert files[f"{DOWN}.weight_zero_point"].shape == (n_out * written // 32, groups)
    assert not any(k.endswith("weight_g_idx") for k in files)

    # 1. compressed-tensors' own decompression: our weights bit for bit (float32; float16 rounded)
    check_compressed_tensors(out, ours)
    # 2. transformers' compressed-tensors loader: our weights, so our logits (asymmetric: float16-rounded)
    got = check_transformers(out, ours)
    assert rel_err(got, want) <= (1e-5 if symmetric else 1e-3)
    # 3. our reader: the same weights, so the same logits
    back = load_compressed(out)
    for name, module in ours.items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(torch.float32), module.dequantize_weight())
    assert rel_err(logits(back), want) <= 1e-6


def test_ragged_groups_are_written_with_repeated_scales(fp_dir, tmp_path):
    """g96: one group covers the 64 inputs of most linears (written per channel); down_proj's 128 inputs are
    groups 0-95 and 96-127, written exactly as blocks of 32 with each group's scale repeated (three times,
    then once), also under an act-order permutation of whole blocks."""
    model = quantize(fp_dir, group_size=96)
    blocks = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    perm = torch.cat([b * 32 + torch.randperm(32, generator=torch.Generator().manual_seed(b)) for b in blocks.tolist()])
    replace_module(model, "model.layers.0.mlp.down_proj", lambda m: with_perm(m, perm.int(), keep_weight=False))
    ours = quantized(model)
    out = tmp_path / "ragged"
    report = export_model(model, out, "compressed-tensors", progress=False)
    assert report.exact and report.quantized[Q_PROJ] == "int4 channel sym"
    assert report.quantized[DOWN] == "int4 g32 sym (its g96 scales repeated over blocks of 32)"
    groups = config_of(out)["config_groups"]
    assert [g["weights"]["group_size"] for g in groups.values()] == [None, 32]
    assert groups["group_1"]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    files = load_file(out / "model.safetensors")
    assert torch.equal(files[f"{DOWN}.weight_scale"], ours[DOWN].weight_scale[:, [0, 0, 0, 1]])
    check_compressed_tensors(out, ours)
    assert rel_err(check_transformers(out, ours), logits(model)) <= 1e-5
    back = load_compressed(out)
    for name, module in ours.items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(torch.float32), module.dequantize_weight())


def test_packing_is_compressed_tensors_own_bytes():
    """``weight_packed`` / ``weight_zero_point`` are what compressed-tensors' ``pack_to_int32`` writes from the
    signed values (ragged widths included: the last word is zero-padded, never our 32-code padding)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        for n in (64, 80, 100, 3):
            u = torch.randint(0, 2**bits, (6, n), generator=gen, dtype=torch.int32).to(torch.uint8)
            signed = (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
            assert torch.equal(pack_dense(u, bits), pack_to_int32(signed, bits)), (bits, n)
            zero_point = pack_dense(u.t().contiguous(), bits).t().contiguous()  # along the output dim
            assert torch.equal(zero_point, pack_to_int32(signed, bits, packed_dim=0)), (bits, n)


def test_folder_written_by_compressed_tensors_reexports_byte_for_byte(tmp_path):
    """A folder compressed-tensors wrote (asymmetric int4 g32, bf16 scales), read by our reader and exported
    again: every tensor is the one compressed-tensors wrote."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = make_tiny_llama(seed=4, tie=False).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    qconf = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]
    )
    apply_quantization_config(model, qconf, show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            wg = module.weight.data.reshape(module.weight.shape[0], -1, 32)
            scale, zero_point = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "by_ct")
    compressor.update_config(tmp_path / "by_ct")
    theirs = load_file(tmp_path / "by_ct" / "model.safetensors")

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # see load_with_transformers
        AutoModelForCausalLM.from_pretrained(tmp_path / "by_ct")
    ours = load_compressed(tmp_path / "by_ct", dtype=torch.bfloat16)
    report = export_model(ours, tmp_path / "again", "compressed-tensors", progress=False)
    assert report.exact and report.quantized[Q_PROJ] == "int4 g32 asym"
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert set(again) == set(theirs)
    for key, tensor in theirs.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert config_of(tmp_path / "again")["config_groups"]["group_0"]["weights"] == {
        k: v for k, v in config_of(tmp_path / "by_ct")["config_groups"]["group_0"]["weights"].items() if k != "zp_dtype"
    }


# ----------------------------------------------------------------------------- W8A8 (int-quantized)


def ct_activation_reference(model, folder, static_scales: dict[str, float] | None = None):
    """A float32 Llama with our de-quantized weights whose quantized linears fake-quantize their inputs as
    compressed-tensors' own emulation defines it (``calculate_qparams``): per token, ``scale =
    max|x| / 127.5`` (its int8 range is ``[-128, 127]``, half of 255), ``clamp(round(x / scale), -128,
    127) * scale``; static: the stored ``input_scale``."""
    ref = LlamaForCausalLM(LlamaConfig.from_pretrained(folder)).eval()
    state = {k: v for k, v in model.state_dict().items() if k in ref.state_dict()}
    for name, module in quantized(model).items():
        state[f"{name}.weight"] = module.dequantize_weight(torch.float32)
    ref.load_state_dict(state, strict=False)

    def hook(name):
        def fake_quant(_, args):
            x = args[0]
            if static_scales is None:
                s = x.abs().amax(-1, keepdim=True) / 127.5
            else:
                s = torch.tensor(static_scales[name], dtype=x.dtype)
            return (torch.clamp(torch.round(x / s), -128, 127) * s,)

        return fake_quant

    for name in quantized(model):
        ref.get_submodule(name).register_forward_pre_hook(hook(name))
    return ref


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_w8a8_export_is_int_quantized_with_the_activation_scheme(fp_dir, tmp_path, mode):
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir,
        efficiency_config={
            "quantization": {"bits": 8, "group_size": None, "symmetric": True},
            "activations": {"mode": "dynamic"},
        },
    ).eval()
    scales = None
    if mode == "static":  # calibrated-looking scales: |x| of these inputs stays below 127 steps
        scales = {name: 0.05 for name in quantized(model)}
        for name in scales:
            replace_module(model, name, lambda m: as_static(m, 0.05))
    ours = quantized(model)
    assert {m.act_mode for m in ours.values()} == {mode}
    want = logits(model)
    out = tmp_path / "w8a8"
    report = export_model(model, out, "compressed-tensors", progress=False)
    per = "dynamic per token" if mode == "dynamic" else "static per tensor"
    assert report.exact and report.quantized[Q_PROJ] == f"int8 channel sym, int8 activations {per}"
    qc = config_of(out)
    check_config_is_compressed_tensors(qc)
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "int-quantized"
    assert group["weights"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "channel",
        "dynamic": False,
    }
    assert group["input_activations"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "token" if mode == "dynamic" else "tensor",
        "dynamic": mode == "dynamic",
    }
    files = load_file(out / "model.safetensors")
    assert files[f"{DOWN}.weight"].dtype == torch.int8 and files[f"{DOWN}.weight"].shape == (64, 128)
    assert files[f"{DOWN}.weight_scale"].shape == (64, 1)
    if mode == "static":
        assert torch.equal(files[f"{DOWN}.input_scale"], torch.tensor([0.05], dtype=torch.float32))
    else:
        assert f"{DOWN}.input_scale" not in files

    check_compressed_tensors(out, ours)
    # transformers runs compressed-tensors' activation emulation on our exact weights
    got = check_transformers(out, ours)
    with torch.no_grad():
        emulated = ct_activation_reference(model, out, scales)(IDS).logits
    assert rel_err(got, emulated) <= 1e-5  # measured 0.0
    # static: the same numbers as our int8 kernel (measured 1.7e-7); dynamic: our kernel (and vLLM's) take
    # per-token scales max|x| / 127, the emulation max|x| / 127.5 (measured 8.7e-3)
    assert rel_err(got, want) <= (1e-5 if mode == "static" else 0.05)
    # our reader takes weight-only compressed-tensors folders
    with pytest.raises(FormatError, match="input_activations quantization is not supported"):
        load_compressed(out)


# ----------------------------------------------------------------------------- mixed schemes, ignore, ties


MIXED = {
    "self_attn.q_proj": {"bits": 8, "group_size": None, "symmetric": True},
    "self_attn.k_proj": {"bits": 8, "group_size": None, "symmetric": True},
    "self_attn.v_proj": {"bits": 8, "group_size": None, "symmetric": True},
    "mlp.gate_proj": {"bits": 4, "group_size": 64, "symmetric": True},
    "mlp.up_proj": {"bits": 2, "group_size": 16, "symmetric": True},
}


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "with-asym"])
def test_mixed_schemes_get_one_group_each_with_exact_targets(tmp_path, asym):
    """Per-module schemes (our modules built one by one), a float linear in the middle, a tied float head,
    biases, and float tensors cast to bfloat16."""
    model = make_tiny_llama(seed=6, tie=True, attention_bias=True, mlp_bias=True)
    formats = dict(MIXED)
    if asym:
        formats["mlp.gate_proj"] = {"bits": 4, "group_size": 64, "symmetric": False, "zero_point": "integer"}
    for name, linear in list(model.named_modules()):
        if type(linear) is nn.Linear and name not in ("lm_head", "model.layers.1.self_attn.o_proj"):
            fmt = formats.get(name.split(".", 3)[-1], {"bits": 4, "group_size": 32, "symmetric": True})
            model.set_submodule(name, QuantLinear.from_linear(linear, **fmt))
    ours = quantized(model)
    out = tmp_path / "mixed"
    report = write_compressed_tensors(model, out, tokenizer=make_byte_tokenizer(), dtype="bfloat16", progress=False)
    assert report.exact and len(report.quantized) == 13
    assert report.float_modules == ["model.layers.1.self_attn.o_proj", "lm_head"]
    assert report.quantized["model.layers.1.mlp.up_proj"] == "int4 g16 sym (widened from int2)"
    assert report.quantized["model.layers.1.mlp.gate_proj"] == f"int4 g64 {'asym' if asym else 'sym'}"
    assert report.quantized["model.layers.1.mlp.down_proj"] == "int4 g32 sym"
    fused = [n for n in report.notes if "gate_up_proj" in n]  # gate g64 / up g16: vLLM fuses them
    assert len(fused) == 2 and fused[1].startswith("model.layers.1.mlp.gate_proj, model.layers.1.mlp.up_proj")
    assert not any("qkv_proj" in n for n in report.notes)  # q/k/v share their scheme
    qc = config_of(out)
    check_config_is_compressed_tensors(qc)
    assert qc["format"] == "pack-quantized" and qc["ignore"] == report.float_modules
    groups = qc["config_groups"]
    assert list(groups) == [f"group_{i}" for i in range(4)]
    assert groups["group_0"]["targets"] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"]
    assert groups["group_0"]["weights"]["num_bits"] == 8 and groups["group_0"]["weights"]["strategy"] == "channel"
    assert groups["group_1"]["targets"] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert groups["group_2"]["targets"] == [f"model.layers.{i}.mlp.gate_proj" for i in (0, 1)]
    assert groups["group_2"]["weights"]["symmetric"] is not asym
    assert groups["group_3"]["targets"] == [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]
    files = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in files  # tied to the embedding
    assert files["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert files["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").exists()
    assert "float tensors written in bfloat16" in report.notes

    # our model with the same bfloat16 rounding of its float tensors (scales untouched)
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in ours or name.endswith(".bias"):
            p.data = p.data.to(torch.bfloat16).float()
    want = logits(model)
    check_compressed_tensors(out, ours)
    got = check_transformers(out, ours)  # with-asym: several schemes, transformers loads none (see there)
    if not asym:
        assert rel_err(got, want) <= 1e-5
    back = load_compressed(out)
    for name, module in ours.items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(torch.float32), module.dequantize_weight())
    assert type(back.model.layers[1].self_attn.o_proj) is nn.Linear
    assert rel_err(logits(back), want) <= 1e-6


# ----------------------------------------------------------------------------- refusals and lossy conversion


def ragged_module(module) -> QuantLinear:
    """A g40 module of ``module``'s shape: 40 and its 64 inputs share no block of 16 or more."""
    torch.manual_seed(0)
    linear = nn.Linear(module.in_features, module.out_features, bias=False)
    return QuantLinear.from_linear(linear, bits=4, group_size=40, symmetric=True)


def mixed_groups_perm(module) -> torch.Tensor:
    return torch.randperm(module.in_features, generator=torch.Generator().manual_seed(2)).int()


def test_refusals_name_the_module_and_write_nothing(fp_dir, tmp_path):
    out = tmp_path / "never"
    cases = [
        ({"symmetric": False}, r"its float minima are not whole steps of the scale"),
        ({"scale_dtype": "float32"}, r"its scales \(torch.float32\) are not exact in float16"),
        ({"outliers": 0.02}, r"it keeps 2 outlier weights per row exactly, which compressed-tensors cannot hold"),
    ]
    for quant, message in cases:
        with pytest.raises(
            ExportError,
            match=rf"^model\.layers\.0\.self_attn\.q_proj: cannot be written to compressed-tensors exactly: .*{message}",
        ):
            export_model(quantize(fp_dir, **quant), out, "compressed-tensors", progress=False)
        assert not out.exists()
    model = quantize(fp_dir)
    replace_module(model, Q_PROJ, lambda m: ragged_module(m))
    with pytest.raises(
        ExportError,
        match=r"q_proj: .*group size 40 does not divide its 64 input features and shares no divisor of at least 16",
    ):
        export_model(model, out, "compressed-tensors", progress=False)
    model = quantize(fp_dir)
    replace_module(model, Q_PROJ, lambda m: with_perm(m, mixed_groups_perm(m), keep_weight=False))
    with pytest.raises(
        ExportError, match=r"q_proj: .*act-order permutation mixes the input features of different groups"
    ):
        export_model(model, out, "compressed-tensors", progress=False)
    with pytest.raises(
        ValueError, match=r"option\(s\) 'bits' not allowed; allowed options: scale_dtype, g_idx, progress"
    ):
        export_model(model, out, "compressed-tensors", bits=4)
    with pytest.raises(
        ValueError, match=r"scale_dtype='float32' is not allowed; allowed values: None, float16, bfloat16"
    ):
        export_model(model, out, "compressed-tensors", scale_dtype="float32")
    assert not out.exists()


@pytest.mark.parametrize(
    "quant,name,reason",
    [
        ({"symmetric": False}, Q_PROJ, "float minima are not whole steps"),
        ({"scale_dtype": "float32"}, Q_PROJ, "not exact in float16"),
        ({"outliers": 0.02}, Q_PROJ, "outlier weights"),
        ("ragged", Q_PROJ, "group size 40 does not divide its 64 input features"),
        ("act-order", Q_PROJ, "act-order permutation mixes"),
    ],
    ids=["float-minima", "fp32-scales", "outliers", "ragged-groups", "act-order"],
)
def test_lossy_converts_and_reports_the_measured_change(fp_dir, tmp_path, quant, name, reason):
    model = quantize(fp_dir, **(quant if isinstance(quant, dict) else {}))
    if quant == "act-order":
        replace_module(model, Q_PROJ, lambda m: with_perm(m, mixed_groups_perm(m), keep_weight=False))
    if quant == "ragged":
        replace_module(model, Q_PROJ, ragged_module)
    ours = quantized(model)
    out = tmp_path / "lossy"
    report = export_model(model, out, "compressed-tensors", lossy=True, progress=False)
    assert not report.exact and name in report.changes
    change = report.changes[name]
    assert any(reason in r for r in change.reasons), change.reasons
    assert 0 < change.max_change < 0.5 and 0 < change.rms_change < 0.5
    assert "converted" in report.summary() and name in report.summary()
    if quant == "ragged":  # the allowed size nearest below 40 that divides 64
        assert report.quantized[Q_PROJ] == "int4 g32 sym" and list(report.changes) == [Q_PROJ]
    # the reported change is the one compressed-tensors decompresses (float32: exact products)
    decompressed = ct_decompressed(out, torch.float32)
    for name, module in ours.items():
        w = module.dequantize_weight(torch.float32)
        got = decompressed.get_submodule(name).weight
        measured = float((got - w).abs().max() / w.abs().max())
        if name in report.changes:
            assert measured == pytest.approx(report.changes[name].max_change, rel=1e-6), name
        else:
            assert measured == 0.0, name
    loaded, precision = load_with_transformers(out)
    logits(loaded)  # the first forward de-quantizes
    for name in ours:
        assert torch.equal(
            loaded.get_submodule(name).weight, decompressed.get_submodule(name).weight.to(precision).float()
        )


def test_g_idx_option_writes_the_legacy_act_order_layout(fp_dir, tmp_path):
    """``g_idx=True``: mixed-group act-order kept as ``weight_g_idx`` + ``actorder: "group"`` (codes in input
    order): our reader reads it back exactly; compressed-tensors 0.20 refuses the scheme by name."""
    model = quantize(fp_dir, symmetric=False, zero_point="integer")
    replace_module(model, Q_PROJ, lambda m: with_perm(m, mixed_groups_perm(m), keep_weight=False))
    ours = quantized(model)
    out = tmp_path / "legacy"
    report = export_model(model, out, "compressed-tensors", g_idx=True, progress=False)
    assert report.exact and report.quantized[Q_PROJ] == "int4 g32 asym act-order (g_idx)"
    assert report.engines[0] == "vLLM (with compressed-tensors < 0.20)" and "weight_g_idx" in report.notes[0]
    qc = config_of(out)
    act_order = [g for g in qc["config_groups"].values() if g["weights"].get("actorder") == "group"]
    assert len(act_order) == 1 and act_order[0]["targets"] == [Q_PROJ]
    files = load_file(out / "model.safetensors")
    g_idx = files[f"{Q_PROJ}.weight_g_idx"]
    assert g_idx.dtype == torch.int32 and g_idx.shape == (64,)
    module = ours[Q_PROJ]
    perm = module.weight_perm.long()
    assert torch.equal(g_idx[perm], torch.arange(64, dtype=torch.int32) // 32)  # stored column j -> group j // 32
    back = load_compressed(out)
    for name, m in ours.items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(torch.float32), m.dequantize_weight()), name
    assert rel_err(logits(back), logits(model)) <= 1e-6
    from transformers import CompressedTensorsConfig

    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        CompressedTensorsConfig.from_dict(qc)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_rtn_int4_g128_loads_in_transformers_with_our_logits(tmp_path):
    """SmolLM2-135M, RTN int4 g128 symmetric: exact. Its hidden size 576 is 4.5 groups of 128, so the
    linears reading it are written as blocks of 64 with each scale repeated (the last group once)."""
    from transformers import AutoTokenizer

    from hf_efficiency.demo import bundled_model_path

    path = str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    spec = {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, efficiency_config={"quantization": spec})
    with torch.no_grad():
        want = model(ids).logits
    out = tmp_path / "smollm2-ct"
    report = export_model(model, out, "compressed-tensors", progress=False)
    assert report.exact and report.float_modules == ["lm_head"] and len(report.quantized) == 30 * 7
    repeated = {n for n, m in quantized(model).items() if m.in_features == 576}
    assert len(repeated) == 30 * 6
    assert {report.quantized[n] for n in repeated} == {"int4 g64 sym (its g128 scales repeated over blocks of 64)"}
    assert {v for n, v in report.quantized.items() if n not in repeated} == {"int4 g128 sym"}
    loaded, precision = load_with_transformers(out)
    with torch.no_grad():
        got = loaded(ids).logits
    for name, module in quantized(model).items():  # de-quantized by that first forward: our weights
        assert torch.equal(loaded.get_submodule(name).weight, module.dequantize_weight(torch.float32)), name
    err = rel_err(got, want)
    size = sum(os.path.getsize(out / f) for f in os.listdir(out)) / 1e6
    print(
        f"SmolLM2 int4 g128 -> compressed-tensors: {len(report.quantized)} linears, {ids.shape[1]} tokens; "
        f"transformers logits rel err {err:.3e}, max abs {float((got - want).abs().max()):.3e}, argmax "
        f"agreement {float((got.argmax(-1) == want.argmax(-1)).float().mean()):.3f}; folder {size:.1f} MB"
    )
    assert precision == torch.float32 and err <= 1e-5
