"""The fused CPU kernel as a torch operator, and a compiled static-cache decode step of a quantized model
(quantized head included) giving the eager path's greedy tokens, without a graph break."""

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_efficiency import QuantLinear, compiled_generate_kwargs, cpu_compile_config
from hf_efficiency.quant.kernels import cpu as cpu_kernel


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp")
    make_tiny_llama(seed=7, tie=True).save_pretrained(path)
    cfg = {"quantization": {"bits": 4, "group_size": 32, "modules_to_not_convert": []}}
    return AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg)


def test_operator_matches_the_extension_and_passes_opcheck(quantized):
    assert cpu_kernel.extension() is not None, cpu_kernel.unavailable_reason()
    module = quantized.model.layers[0].mlp.up_proj
    x = torch.randn(3, module.in_features)
    module(x)  # builds the layout
    lay = module.kernel_layout("cpu")
    args = (lay.q, lay.scale, lay.minimum, lay.bits, lay.offset, lay.group, x, cpu_kernel.vector_bits(), None)
    assert torch.equal(torch.ops.hf_efficiency.quant_gemm(*args), cpu_kernel.extension().quant_gemm(*args))
    torch.library.opcheck(torch.ops.hf_efficiency.quant_gemm.default, args)


def test_cpu_compile_config_compiles_on_cpu():
    config = cpu_compile_config()
    assert config._compile_all_devices and config.fullgraph and config.mode == "default" and not config.dynamic
    kwargs = compiled_generate_kwargs(mode="max-autotune-no-cudagraphs")
    assert kwargs["cache_implementation"] == "static" and kwargs["compile_config"].mode == "max-autotune-no-cudagraphs"


def test_compiled_decode_gives_the_eager_greedy_tokens(quantized):
    assert isinstance(quantized.lm_head, QuantLinear)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    eager = quantized.generate(ids, **greedy)
    torch._dynamo.reset()
    compiled = quantized.generate(ids, **greedy, **compiled_generate_kwargs())  # fullgraph: a break would raise
    assert torch.equal(compiled, eager)
    assert quantized.model.layers[1].self_attn.q_proj.last_path == "cpu_fused"  # eager calls before tracing
