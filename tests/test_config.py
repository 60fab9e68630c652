"""EfficiencyConfig: validation, round trips, format version."""

import json

import pytest

import hf_efficiency
from hf_efficiency import FORMAT_VERSION, EfficiencyConfig, QuantizationSpec


def test_defaults_and_round_trip_through_dict_and_json():
    cfg = EfficiencyConfig(
        quantization={"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False, "clip": "mse"}
    )
    d = cfg.to_dict()
    assert d == {
        "quant_method": "hf_efficiency",
        "format_version": FORMAT_VERSION,
        "quantization": {
            "method": "rtn",
            "rtn": {},
            "bits": 4,
            "group_size": 128,
            "symmetric": False,
            "zero_point": "float",
            "clip": "mse",
            "clip_grid": 20,
            "clip_max_shrink": 0.5,
            "scale_dtype": "float16",
            "modules_to_not_convert": None,
            "outliers": 0.0,
            "module_bits": None,
            "target_bits": None,
            "bits_choices": [2, 3, 4, 8],
            "module_formats": None,
        },
    }
    again = EfficiencyConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.to_dict() == d
    assert isinstance(again.quantization, QuantizationSpec)


def test_method_options_nest_under_the_method_and_flat_keys_of_earlier_versions_still_load():
    nested = EfficiencyConfig(quantization={"method": "gptq", "gptq": {"act_order": True}})
    d = nested.to_dict()["quantization"]
    assert d["gptq"] == {"damp": 0.01, "act_order": True, "block_size": 128} and "gptq_act_order" not in d
    # a config.json written before options were nested: every method's flat keys, with defaults
    legacy = {
        "method": "gptq",
        "gptq_damp": 0.01,
        "gptq_act_order": True,
        "gptq_block_size": 128,
        "awq_grid": 20,
        "awq_clip": True,
        "hqq_iters": 20,
        "hqq_optimize_scale": False,
    }
    again = EfficiencyConfig(quantization=legacy)
    assert again == nested and again.quantization.options.act_order is True
    assert EfficiencyConfig.from_dict(json.loads(nested.to_json_string())) == nested
    hqq = EfficiencyConfig(quantization={"method": "hqq", "hqq": {"iters": 5}}).quantization
    assert hqq.options.iters == 5 and hqq.options.optimize_scale is False
    assert hqq.with_method("rtn").to_dict()["rtn"] == {} and hqq.with_method("rtn").bits == hqq.bits


@pytest.mark.parametrize(
    "section, message",
    [
        ({"method": "gptq", "gptq": {"damp": 0}}, r"quantization.gptq.damp=0 is not allowed; allowed values: a float"),
        (
            {"method": "gptq", "gptq": {"dmp": 0.1}},
            r"unknown key\(s\) 'dmp' in quantization.gptq; allowed keys: damp, act_order, block_size",
        ),
        (
            {"method": "rtn", "gptq": {"damp": 0.1}},
            r"quantization.gptq holds options of method 'gptq', but quantization.method='rtn'",
        ),
        (
            {"method": "awq", "awq": [1]},
            r"quantization.awq=\[1\] is not allowed; allowed values: a dict with keys grid, clip",
        ),
        (
            {"method": "awq", "awq_grid": 1},
            r"quantization.awq_grid=1 is not allowed; allowed values: an integer in \[2, 100\]",
        ),
        (
            {"method": "hqq", "symmetric": True},
            r"quantization.symmetric=True is not allowed; allowed values: False \(hqq optimizes",
        ),
        ({"method": "int4"}, r"quantization.method='int4' is not allowed; allowed values: rtn, hqq, awq, gptq"),
    ],
)
def test_method_option_errors_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        EfficiencyConfig(quantization=section)


def test_section_dataclass_accepted_and_group_size_minus_one_means_per_channel():
    cfg = EfficiencyConfig(quantization=QuantizationSpec(bits=8, group_size=-1, symmetric=True))
    assert cfg.quantization.group_size is None and cfg.quantization.bits == 8


@pytest.mark.parametrize(
    "section, message",
    [
        ({"bits": 5}, r"quantization.bits=5 is not allowed; allowed values: 8, 4, 3, 2"),
        ({"bits": True}, r"quantization.bits=True is not allowed"),
        (
            {"group_size": 48},
            r"quantization.group_size=48 is not allowed; allowed values: None \(per output channel\) or 32",
        ),
        ({"group_size": 512}, r"group_size=512"),
        ({"method": "magic"}, r"quantization.method='magic' is not allowed; allowed values: rtn, hqq, awq, gptq"),
        ({"clip": "yes"}, r"quantization.clip='yes' is not allowed; allowed values: none, mse"),
        (
            {"scale_dtype": "float64"},
            r"scale_dtype='float64' is not allowed; allowed values: float16, bfloat16, float32",
        ),
        ({"clip_max_shrink": 1.5}, r"clip_max_shrink=1.5"),
        (
            {"modules_to_not_convert": "lm_head"},
            r"modules_to_not_convert='lm_head' is not allowed; allowed values: None or a list",
        ),
        ({"bitz": 4}, r"unknown key\(s\) 'bitz' in section 'quantization'; allowed keys: method, bits, group_size"),
    ],
)
def test_bad_values_name_key_and_allowed_values(section, message):
    with pytest.raises(ValueError, match=message):
        EfficiencyConfig(quantization=section)


def test_unknown_section_and_bad_section_type():
    with pytest.raises(
        ValueError,
        match=r"unknown EfficiencyConfig section\(s\) 'quantisation'; allowed sections: activations, attention, calibration, peft, quantization, speculative$",
    ):
        EfficiencyConfig(quantisation={"bits": 4})
    with pytest.raises(ValueError, match=r"section 'quantization' must be a dict or QuantizationSpec, got int"):
        EfficiencyConfig(quantization=4)


def test_newer_format_version_is_refused_with_upgrade_hint():
    with pytest.raises(
        ValueError,
        match=rf"format version {FORMAT_VERSION + 1}.*reads format versions up to {FORMAT_VERSION}.*pip install -U hf-efficiency",
    ):
        EfficiencyConfig.from_dict({"quant_method": "hf_efficiency", "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="quant_method='gptq' is not allowed"):
        EfficiencyConfig(quant_method="gptq")


def test_coerce_accepts_dict_and_rejects_other_types():
    assert EfficiencyConfig.coerce({"quantization": {"bits": 8}}).quantization.bits == 8
    with pytest.raises(TypeError, match="efficiency_config must be an EfficiencyConfig or a dict, got str"):
        EfficiencyConfig.coerce("int4")


def test_public_api_exports():
    assert hf_efficiency.EfficiencyConfig is EfficiencyConfig
    assert hf_efficiency.QUANT_METHOD == "hf_efficiency"


def test_module_formats_are_validated_completed_and_round_trip():
    spec = QuantizationSpec(
        bits=4,
        group_size=128,
        module_formats={
            "model.layers.0.mlp.down_proj": {"bits": 6, "group_size": 16, "symmetric": True, "scale_dtype": "float32"},
            "lm_head": {"bits": 5, "act_order": True},
        },
    )
    assert spec.format_of("lm_head") == {
        "bits": 5,
        "group_size": 128,
        "symmetric": False,
        "scale_dtype": "float16",
        "act_order": True,
        "zero_point": "float",
    }  # missing keys take the section's values
    assert spec.format_of("model.layers.1.mlp.up_proj") == {
        "bits": 4,
        "group_size": 128,
        "symmetric": False,
        "scale_dtype": "float16",
        "act_order": False,
        "zero_point": "float",
    }
    cfg = EfficiencyConfig(quantization=spec)
    assert EfficiencyConfig(**json.loads(cfg.to_json_string())) == cfg
    bad = [
        ({"m": {"bits": 7}}, r"module_formats\['m'\].bits=7 is not allowed; allowed values: 2, 3, 4, 5, 6, 8"),
        ({"m": {"group_size": 0}}, r"module_formats\['m'\].group_size=0 is not allowed; allowed values: None or a "),
        ({"m": {"scale": 1}}, r"module_formats\['m'\]=\{'scale': 1\} is not allowed; allowed values: a dict with keys"),
        ({"m": {"act_order": 1}}, r"module_formats\['m'\].act_order=1 is not allowed; allowed values: True, False"),
        ({"m": {"scale_dtype": "int8"}}, r"module_formats\['m'\].scale_dtype='int8' is not allowed"),
        (["m"], r"quantization.module_formats=\['m'\] is not allowed; allowed values: None or a dict"),
    ]
    for formats, message in bad:
        with pytest.raises(ValueError, match=message):
            QuantizationSpec(module_formats=formats)
    with pytest.raises(ValueError, match="keep_compressed='yes' is not allowed; allowed values: True, False"):
        EfficiencyConfig(keep_compressed="yes")
