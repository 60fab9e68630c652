"""Quantized inference with accelerate's offload: ``device_map`` / ``max_memory`` / ``offload_folder`` place our
`QuantLinear` modules on CPU or disk as accelerate decides; outputs are the in-memory model's bit for bit, an
offloaded module keeps no kernel layout between calls, and the offloaded model saves and reloads."""

from __future__ import annotations

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from transformers import AutoModelForCausalLM

import hf_efficiency  # noqa: F401
from hf_efficiency import EfficiencyConfig, QuantLinear


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    model = make_tiny_llama(0, tie=False, num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    model.save_pretrained(root / "float")
    make_byte_tokenizer().save_pretrained(root / "float")
    cfg = EfficiencyConfig(quantization={"method": "rtn", "bits": 4, "group_size": 32})
    AutoModelForCausalLM.from_pretrained(root / "float", efficiency_config=cfg).save_pretrained(root / "q4")
    return root / "q4"


def _inputs() -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "placement",
    [
        {"max_memory": {"cpu": "400KB"}},  # accelerate decides: the first modules in memory, the rest on disk
        {
            "device_map": {
                "model.embed_tokens": "cpu",
                "model.layers.0": "cpu",
                "model.layers.1": "disk",
                "model.layers.2": "cpu",
                "model.layers.3": "disk",
                "model.norm": "cpu",
                "model.rotary_emb": "cpu",
                "lm_head": "disk",
            }
        },
    ],
    ids=["auto-max-memory", "explicit-map"],
)
def test_offloaded_quantized_model_computes_the_same(quantized_dir, tmp_path, placement):
    reference = AutoModelForCausalLM.from_pretrained(quantized_dir)
    kwargs = {"device_map": "auto", **placement, "offload_folder": str(tmp_path / "offload")}
    model = AutoModelForCausalLM.from_pretrained(quantized_dir, **kwargs)
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, model.hf_device_map
    on_disk = [m for m in model.modules() if isinstance(m, QuantLinear) and m.offloaded]
    assert on_disk and all(m.weight.is_meta for m in on_disk)

    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    # offloaded modules are back on meta and hold no kernel layout (it would defeat the offload)
    assert all(m.weight.is_meta and not m._kernel_cache for m in on_disk)
    assert torch.equal(
        model.generate(x, max_new_tokens=6, do_sample=False), reference.generate(x, max_new_tokens=6, do_sample=False)
    )

    model.save_pretrained(tmp_path / "resaved")  # transformers reads the offloaded tensors back to save them
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, reference(x).logits)


def test_resident_modules_keep_their_layouts(quantized_dir, tmp_path):
    """Modules that accelerate leaves in memory keep caching kernel layouts (only offloaded ones rebuild)."""
    model = AutoModelForCausalLM.from_pretrained(
        quantized_dir, device_map="auto", max_memory={"cpu": "400KB"}, offload_folder=str(tmp_path / "o")
    )
    resident = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.offloaded]
    assert resident and not any(m.weight.is_meta for m in resident)
    with torch.no_grad():
        model(_inputs())
    cached = [bool(m._kernel_cache) for m in resident]
    plain = AutoModelForCausalLM.from_pretrained(quantized_dir)
    with torch.no_grad():
        plain(_inputs())
    expected = [bool(m._kernel_cache) for m in plain.modules() if isinstance(m, QuantLinear)][: len(resident)]
    assert cached == expected
