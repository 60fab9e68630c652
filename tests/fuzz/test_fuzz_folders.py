"""Fuzzing the GPTQ, AWQ and compressed-tensors folder readers (`read_folder` and the checks `load_folder` runs
before ``from_pretrained``): edits of ``config.json`` (its ``quantization_config`` and the model's sizes), of
``model.safetensors.index.json`` and of the safetensors headers, truncations and bit flips of every file.
Each input must end in `FormatError` or give a state dict that fits the model; an edit of the checkpoint's
structure (index, headers, truncation) must never change what is loaded."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from fuzz.fuzzkit import (
    Slot,
    apply_bytes,
    apply_json,
    attempt,
    byte_mutation,
    changed_tensors,
    fresh_folder,
    fuzz_settings,
    get_path,
    json_mutation,
    json_paths,
    safetensors_parts,
    scratch_dir,
    with_header,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import LlamaConfig

import hf_efficiency  # noqa: F401  (registration)
from hf_efficiency.formats.common import FormatError, check_state_dict, efficiency_config_for, skeleton
from hf_efficiency.formats.folders import load_folder, read_folder
from hf_efficiency.formats.gptq import AWQ_ORDER
from hf_efficiency.quant.core.packing import pack

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
LINEARS += ("mlp.up_proj", "mlp.down_proj")
GROUP = 32


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


SHAPES = {  # (out, in)
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


def _float_tensors(gen) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": (torch.randn(32, 64, generator=gen) * 0.05).half(),
        "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=torch.float16),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(64, dtype=torch.float16),
        "model.norm.weight": torch.ones(64, dtype=torch.float16),
        "lm_head.weight": (torch.randn(32, 64, generator=gen) * 0.05).half(),
    }


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM: ``values [rows, n]`` 8 per word along dim 1, nibble k = ``values[:, 8c + AWQ_ORDER[k]]``."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    return _to_int32((v << torch.arange(0, 32, 4)).sum(-1))


def gptq_tensors(gen) -> dict[str, torch.Tensor]:
    out = _float_tensors(gen)
    for part, (n_out, n_in) in SHAPES.items():
        name, groups = f"model.layers.0.{part}", n_in // GROUP
        codes = torch.randint(0, 16, (n_out, n_in), generator=gen)
        zeros = torch.randint(1, 16, (groups, n_out), generator=gen)  # v1 stores zero - 1
        g_idx = torch.arange(n_in) // GROUP
        if part == "self_attn.q_proj":  # act-order: a permutation of the group index
            g_idx = g_idx[torch.randperm(n_in, generator=gen)]
        out[f"{name}.qweight"] = pack(codes, 4).t().contiguous()
        out[f"{name}.qzeros"] = pack(zeros - 1, 4)
        out[f"{name}.scales"] = (torch.rand(groups, n_out, generator=gen) * 0.02 + 0.001).half()
        out[f"{name}.g_idx"] = g_idx.to(torch.int32)
    return out


def awq_tensors(gen) -> dict[str, torch.Tensor]:
    out = _float_tensors(gen)
    for part, (n_out, n_in) in SHAPES.items():
        name, groups = f"model.layers.0.{part}", n_in // GROUP
        out[f"{name}.qweight"] = _awq_pack(torch.randint(0, 16, (n_in, n_out), generator=gen))
        out[f"{name}.qzeros"] = _awq_pack(torch.randint(0, 16, (groups, n_out), generator=gen))
        out[f"{name}.scales"] = (torch.rand(groups, n_out, generator=gen) * 0.02 + 0.001).half()
    return out


def ct_tensors(gen) -> dict[str, torch.Tensor]:
    out = _float_tensors(gen)
    for part, (n_out, n_in) in SHAPES.items():
        name, groups = f"model.layers.0.{part}", n_in // GROUP
        out[f"{name}.weight_packed"] = pack(torch.randint(0, 16, (n_out, n_in), generator=gen), 4)
        out[f"{name}.weight_scale"] = (torch.rand(n_out, groups, generator=gen) * 0.02 + 0.001).half()
        out[f"{name}.weight_zero_point"] = (
            pack(torch.randint(0, 16, (groups, n_out), generator=gen), 4).t().contiguous()
        )
        out[f"{name}.weight_shape"] = torch.tensor([n_out, n_in])
    return out


FORMATS = {
    "gptq": (
        gptq_tensors,
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP,
            "desc_act": True,
            "sym": False,
            "checkpoint_format": "gptq",
        },
    ),
    "awq": (
        awq_tensors,
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
    ),
    "compressed-tensors": (
        ct_tensors,
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": False,
                        "strategy": "group",
                        "group_size": GROUP,
                    },
                }
            },
            "ignore": ["lm_head"],
        },
    ),
}
TEMPLATES = ("gptq", "gptq-sharded", "awq", "compressed-tensors")


def write_folder(path, template: str) -> None:
    fmt = template.removesuffix("-sharded")
    make, qc = FORMATS[fmt]
    os.makedirs(path, exist_ok=True)
    config = model_config().to_dict()
    config["quantization_config"] = qc
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    tensors = make(torch.Generator().manual_seed(0))
    if not template.endswith("-sharded"):
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map = {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in keys[s::2]}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[s::2]})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)


def read_all(path):
    """What `load_folder` does before ``from_pretrained``: read, derive our config, check every tensor."""
    config, state_dict, formats, float_linears = read_folder(path)
    qcfg = efficiency_config_for(formats, float_linears)
    check_state_dict(skeleton(config, qcfg), state_dict, str(path))
    return state_dict, formats


def same_result(got, original) -> bool:
    """Same formats and the same tensors for every key the original loads (extra keys are tensors the model does
    not use: `check_state_dict` warns about them and ``from_pretrained`` drops them)."""
    (sa, fa), (sb, fb) = got, original
    return fa == fb and all(k in sa and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sb)


def consistent(result) -> None:
    state_dict, formats = result
    assert formats, "no quantized module"
    for name, tensor in state_dict.items():
        if name.endswith(("weight_scale", "weight_min")):
            assert bool(torch.isfinite(tensor).all()), f"{name} holds non-finite values"
        if name.endswith(".weight") and name.rpartition(".")[0] in formats:
            assert tensor.dtype == torch.int32, f"{name} is {tensor.dtype}"


@functools.cache
def templates() -> dict[str, dict]:
    """Each template folder's files and what reading it gives (built once per process)."""
    root = scratch_dir("folder-templates")
    out = {}
    for template in TEMPLATES:
        path = root / template
        write_folder(path, template)
        files = {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}
        out[template] = {"path": path, "files": files, "result": read_all(path)}
    return out


FLOAT_DTYPES_BY_WIDTH = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _same_width_float_swap(original_header: dict, edit: tuple) -> bool:
    """A header edit replacing a float dtype by another float dtype of the same width: a consistent file that
    no reader can tell from a genuine one (the bytes are valid either way)."""
    op, path, value = edit
    if op != "replace" or len(path) != 2 or path[1] != "dtype" or not isinstance(value, str):
        return False
    old = original_header[path[0]]["dtype"]
    return FLOAT_DTYPES_BY_WIDTH.get(old) is not None and FLOAT_DTYPES_BY_WIDTH.get(old) == FLOAT_DTYPES_BY_WIDTH.get(
        value
    )


READERS = {
    "gptq": "GPTQ folder (read_folder)",
    "gptq-sharded": "GPTQ folder, sharded (read_folder with model.safetensors.index.json)",
    "awq": "AWQ folder (read_folder)",
    "compressed-tensors": "compressed-tensors folder (read_folder)",
}


@pytest.mark.parametrize("template", TEMPLATES)
@fuzz_settings(25)
@given(data=st.data())
def test_folder_readers_survive_mutations(template, data):
    info = templates()[template]
    files = info["files"]
    path = fresh_folder("fuzz-folders", "folder", files)
    target = data.draw(st.sampled_from(sorted(files)), label="file")
    original = files[target]
    structural = False  # the edit changes the checkpoint's structure only: an accepted result must equal the original
    must_reject = None
    if target.endswith(".json") and data.draw(st.booleans(), label="as JSON"):
        doc = json.loads(original)
        paths = json_paths(doc)
        if target == "config.json" and data.draw(st.integers(0, 3), label="focus") < 3:
            paths = [p for p in paths if p[:1] == ("quantization_config",)]
        edit = data.draw(json_mutation(doc, paths), label="edit")
        mutated = apply_json(doc, edit).encode("utf-8", "surrogatepass")
        what = f"{template}/{target} + {edit!r:.300}"
        if edit[0] == "duplicate":
            must_reject = "duplicate JSON key"
        structural = target != "config.json"
    elif target.endswith(".safetensors") and data.draw(st.booleans(), label="header as JSON"):
        header, _ = safetensors_parts(original)
        edit = data.draw(json_mutation(header, json_paths(header)), label="edit")
        mutated = with_header(original, apply_json(header, edit))
        what = f"{template}/{target} header + {edit!r:.300}"
        if edit[0] == "duplicate" and len(edit[1]) == 1:
            must_reject = "duplicate tensor name"
        structural = not _same_width_float_swap(header, edit)
    else:
        hot, slots = (0, len(original)), ()
        if target.endswith(".safetensors"):
            header, n = safetensors_parts(original)
            hot, slots = (0, 8 + n), (Slot(0, 8, "header length"),)
        mutation = data.draw(byte_mutation(len(original), hot=hot, slots=slots), label="mutation")
        mutated = apply_bytes(original, mutation)
        what = f"{template}/{target} + {mutation!r:.300}"
        if target.endswith(".safetensors"):
            if mutation[0] in ("truncate", "append"):
                must_reject = "the file's length disagrees with its header"
            if len(mutated) == len(original):
                # g_idx and weight_shape are structure too; other data bytes are weights and scales, whose change
                # is a change of the loaded values (then only consistency is checked)
                hit = changed_tensors(original, mutated)
                structural = not any(t is not None and not t.endswith((".g_idx", ".weight_shape")) for t in hit)
            else:
                structural = True
        elif target.endswith(".index.json"):
            structural = True
    (path / target).write_bytes(mutated)

    def check(got):
        consistent(got)
        if structural:
            assert same_result(got, info["result"]), "a structural edit changed what is loaded"

    attempt(
        READERS[template],
        lambda: read_all(path),
        errors=(FormatError,),
        must_reject=must_reject,
        check=check,
        time_limit=60,
        what=what,
    )


# ----------------------------------------------------------------------------- the specific cases


def test_templates_load():
    for template, info in templates().items():
        state_dict, formats = info["result"]
        assert len(formats) == 7, template


def _folder(tmp_path, template):
    path = tmp_path / template
    write_folder(path, template)
    return path


def test_empty_index_names_the_file(tmp_path):
    path = _folder(tmp_path, "gptq-sharded")
    (path / "model.safetensors.index.json").write_bytes(b"")
    with pytest.raises(FormatError, match=r"model.safetensors.index.json: the safetensors index is empty"):
        load_folder(path)


def test_tensor_in_two_shards_is_refused(tmp_path):
    path = _folder(tmp_path, "gptq-sharded")
    first = path / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file

    second = load_file(path / "model-00002-of-00002.safetensors")
    name = sorted(second)[0]
    tensors = load_file(first)
    tensors[name] = torch.zeros_like(second[name])  # shard 2 holds it too: which one would load?
    save_file(tensors, first)
    with pytest.raises(FormatError, match=rf"tensor '{name}' is in both model-00001-of-00002.safetensors"):
        read_all(path)


def test_path_traversal_in_the_index_is_refused(tmp_path):
    path = _folder(tmp_path, "gptq-sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../other/model.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"is not a .safetensors file name in the index's folder"):
        read_all(path)


@pytest.mark.parametrize(
    "template, edit, message",
    [
        ("gptq", {"dynamic": {"(": {"bits": 8}}}, r"quantization_config.dynamic pattern '\(' is not a regex"),
        ("gptq", {"dynamic": [1]}, r"quantization_config.dynamic must be an object"),
        ("gptq", {"bits": 4.5}, r"quantization_config.bits=4.5 is not an integer"),
        ("gptq", {"group_size": float("inf")}, r"quantization_config.group_size=inf is not an integer"),
        ("compressed-tensors", {"ignore": [3]}, r"compressed-tensors ignore must be a list of strings"),
        ("compressed-tensors", {"config_groups": {"g": [1]}}, r"config_groups\['g'\] must be an object"),
        (
            "compressed-tensors",
            {"config_groups": {"g": {"targets": ["re:("], "weights": {"num_bits": 4}}}},
            r"targets entry 're:\(' is not a regex",
        ),
        (
            "compressed-tensors",
            {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4.0, "group_size": 32}}}},
            r"num_bits=4.0 is not supported",
        ),
        ("awq", {"group_size": "x"}, r"quantization_config.group_size='x' is not an integer"),
    ],
)
def test_bad_quantization_config_values_are_named(tmp_path, template, edit, message):
    path = _folder(tmp_path, template)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(edit)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=message):
        read_all(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_hidden_layers", 2**31, r"config says num_hidden_layers=2147483648, but the checkpoint holds \d+ tensors"),
        ("num_attention_heads", 0, r"transformers cannot (read|build)"),
        ("model_type", "no-such-model", r"config.json: transformers cannot read the model config"),
    ],
)
def test_absurd_model_configs_are_format_errors(tmp_path, key, value, message):
    path = _folder(tmp_path, "awq")
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=message):
        read_all(path)


def test_non_finite_scales_and_integer_float_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file

    path = _folder(tmp_path, "awq")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.scales"][0, 0] = float("nan")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        FormatError, match=r"tensor 'model.layers.0.mlp.up_proj.scales' in model.safetensors holds non-finite"
    ):
        read_all(path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.scales"][0, 0] = 0.01
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int16)  # same bytes, integer dtype
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        FormatError, match=r"tensor 'model.norm.weight' has dtype torch.int16, expected a floating-point"
    ):
        read_all(path)


def test_header_of_a_shard_is_checked_with_the_index(tmp_path):
    path = _folder(tmp_path, "gptq-sharded")
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    header, n = safetensors_parts(data)
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F16")
    header[name]["shape"] = [header[name]["shape"][0] * 2] + header[name]["shape"][1:]
    shard.write_bytes(with_header(data, json.dumps(header)))
    with pytest.raises(FormatError, match=rf"model-00002-of-00002.safetensors: tensor '{name}': shape .* needs"):
        read_all(path)
    assert get_path(header, (name, "dtype")) == "F16"
