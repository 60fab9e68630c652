"""Fuzzing `EfficiencyConfig.from_dict` (what a plain ``from_pretrained`` calls on ``config.json``'s
``quantization_config``): edits of valid configs and random dicts must raise ``ValueError`` with a message or
give a config whose values have exactly the documented types and that round-trips through JSON unchanged."""

from __future__ import annotations

import json

import pytest
from fuzz.fuzzkit import JSON_VALUES, apply_json, attempt, fuzz_settings, json_mutation, json_paths
from hypothesis import given
from hypothesis import strategies as st

from hf_efficiency import EfficiencyConfig
from hf_efficiency.constants import KV_BITS, QUANT_BITS, SCALE_DTYPES, STORAGE_BITS
from hf_efficiency.quant.modules.replace import is_skipped

READER = "EfficiencyConfig.from_dict"

VALID = [
    EfficiencyConfig(quantization={"method": "rtn", "bits": 4, "group_size": 128}).to_dict(),
    EfficiencyConfig(
        quantization={
            "method": "gptq",
            "bits": 4,
            "gptq": {"act_order": True},
            "module_bits": {"down_proj": 8},
            "modules_to_not_convert": ["lm_head"],
            "module_formats": {"model.layers.0.mlp.down_proj": {"bits": 6, "group_size": 16}},
        },
        calibration={"dataset": "kjv", "samples": 8},
        attention={"implementation": "sdpa", "kv_cache_bits": 4},
    ).to_dict(),
    EfficiencyConfig(
        quantization={"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
        activations={"mode": "static", "smoothquant": 0.5},
        speculative={"draft": "int4-g32", "schedule": "constant"},
    ).to_dict(),
    EfficiencyConfig(
        quantization={"method": "hqq", "bits": 3, "zero_point": "integer", "outliers": 0.01},
        peft={"method": "bitfit", "bitfit_targets": ["v_proj"]},
    ).to_dict(),
]
PATHS = [json_paths(v) for v in VALID]
NAMES = ("model.layers.0.mlp.down_proj", "lm_head", "model.layers.1.self_attn.q_proj")


def well_typed(cfg: EfficiencyConfig) -> None:
    """What the rest of the library relies on, checked independently of config.py's validation."""
    q = cfg.quantization
    if q is not None:
        assert type(q.bits) is int and q.bits in QUANT_BITS, q.bits
        assert q.group_size is None or (type(q.group_size) is int and 32 <= q.group_size <= 256), q.group_size
        assert type(q.symmetric) is bool and q.scale_dtype in SCALE_DTYPES
        assert all(type(b) is int and b in QUANT_BITS for b in q.bits_choices)
        assert q.module_bits is None or all(type(b) is int and b in QUANT_BITS for b in q.module_bits.values())
        for fmt in (q.module_formats or {}).values():
            assert type(fmt["bits"]) is int and fmt["bits"] in STORAGE_BITS, fmt
            assert fmt["group_size"] is None or (type(fmt["group_size"]) is int and fmt["group_size"] >= 1), fmt
        assert type(q.outliers) is float and 0 <= q.outliers <= 0.1
        for name in NAMES:  # the pattern matchers the loaders use must work on every accepted pattern list
            q.format_of(name)
            is_skipped(name, q.modules_to_not_convert)
    attention = getattr(cfg, "attention", None)
    if attention is not None:
        assert attention.kv_cache_bits is None or (
            type(attention.kv_cache_bits) is int and attention.kv_cache_bits in KV_BITS
        )
    activations = getattr(cfg, "activations", None)
    if activations is not None:
        assert type(activations.bits) is int and activations.bits == 8
    assert type(cfg.dequantize) is bool and type(cfg.format_version) is int
    text = cfg.to_json_string()  # strict JSON: no NaN, every value serializable
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"{c} in to_json_string")))
    again = EfficiencyConfig.from_dict(json.loads(text))
    assert again == cfg, "the config does not round-trip through JSON"


def _load(text: str):
    return EfficiencyConfig.from_dict(json.loads(text))


@fuzz_settings(300)
@given(data=st.data())
def test_config_survives_edits_of_valid_configs(data):
    i = data.draw(st.integers(0, len(VALID) - 1), label="template")
    doc, paths = VALID[i], PATHS[i]
    for round_ in range(data.draw(st.integers(1, 2), label="edits")):
        text = apply_json(doc, data.draw(json_mutation(doc, paths), label=f"edit {round_}"))
        doc = json.loads(text)
        paths = json_paths(doc)
    attempt(
        READER,
        lambda: _load(text),
        errors=(ValueError,),
        check=well_typed,
        time_limit=10,
        what=f"{text[:400]}",
    )


SECTION_KEYS = ("quantization", "calibration", "activations", "speculative", "attention", "peft")


@fuzz_settings(200)
@given(
    doc=st.dictionaries(
        st.one_of(
            st.sampled_from(SECTION_KEYS + ("format_version", "quant_method", "dequantize", "base_model")),
            st.text(max_size=6),
        ),
        JSON_VALUES,
        max_size=4,
    )
)
def test_config_survives_random_dicts(doc):
    attempt(
        READER, lambda: EfficiencyConfig.from_dict(doc), errors=(ValueError,), check=well_typed, what=repr(doc)[:400]
    )


# ----------------------------------------------------------------------------- the specific messages


@pytest.mark.parametrize(
    "section, value, message",
    [
        (
            "quantization",
            {"bits": 4.0},
            r"quantization.bits=4.0 is not allowed; allowed values: 8, 4, 3, 2 \(bits must be an int, got float\)",
        ),
        ("quantization", {"module_bits": {"down_proj": 8.0}}, r"module_bits=.* an int in 8, 4, 3, 2"),
        ("quantization", {"bits_choices": [4.0, 8]}, r"bits_choices=.*a non-empty list of ints"),
        ("quantization", {"module_formats": {"m": {"bits": 5.0}}}, r"module_formats\['m'\].bits=5.0 .*must be an int"),
        (
            "quantization",
            {"modules_to_not_convert": ["lm_head("]},
            r"modules_to_not_convert=.*'lm_head\(' is not a regex",
        ),
        ("quantization", {"modules_to_not_convert": 3}, r"modules_to_not_convert=3 is not allowed"),
        ("activations", {"bits": 8.0}, r"activations.bits=8.0 is not allowed; allowed values: 8 \(bits must be an int"),
        ("attention", {"kv_cache_bits": 4.0}, r"attention.kv_cache_bits=4.0 is not allowed"),
        ("speculative", {"draft": "early-exit:" + "9" * 5000}, r"speculative.draft='early-exit:9999"),
    ],
)
def test_float_widths_and_bad_patterns_are_rejected_at_config_time(section, value, message):
    """``bits=4.0`` used to be accepted (``4.0 in (8, 4, 3, 2)``) and to fail deep inside torch at load time."""
    base = {"quantization": {"bits": 8, "group_size": None, "symmetric": True}} if section == "activations" else {}
    with pytest.raises(ValueError, match=message):
        EfficiencyConfig(**{**base, section: value})


def test_non_string_keys_and_non_bool_flags_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'x', 1 in section 'quantization'"):
        EfficiencyConfig(quantization={1: 2, "x": 3})
    with pytest.raises(ValueError, match=r"EfficiencyConfig keys must be strings; got 1"):
        EfficiencyConfig.from_dict({1: {}})
    with pytest.raises(ValueError, match=r"dequantize='false' is not allowed; allowed values: True, False"):
        EfficiencyConfig(dequantize="false")  # bool('false') is True
