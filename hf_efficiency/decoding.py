"""Compiled decoding on CPU: transformers' static cache plus ``torch.compile`` of the decode step.

transformers compiles a model's forward inside ``generate`` when the cache is static
(``cache_implementation="static"``) and the device is a GPU; on CPU it compiles only when the
``CompileConfig`` says so through a private flag. :func:`cpu_compile_config` sets it, and
:func:`compiled_generate_kwargs` gives the two ``generate`` arguments together::

    from hf_efficiency import compiled_generate_kwargs

    out = model.generate(ids, max_new_tokens=64, **compiled_generate_kwargs())

The fused CPU kernel of `QuantLinear` is a torch operator (``torch.ops.hf_efficiency.quant_gemm``),
so the traced step holds every quantized linear without a graph break. The first ``generate`` call
compiles (10-40 s for SmolLM2-135M on 2 cores, as measured by ``benchmarks/decode.py``); later calls with the same batch size and a cache
at least as long reuse the compiled step. Greedy output is the same tokens as eager decoding (tested):
the compiled step runs the same kernels, with elementwise operations fused by inductor.
"""

from __future__ import annotations

from typing import Any

from transformers import CompileConfig


def cpu_compile_config(**kwargs: Any) -> CompileConfig:
    """A ``transformers.CompileConfig`` (``fullgraph=True``, ``dynamic=False``, ``mode="default"`` unless given:
    transformers' default ``"reduce-overhead"`` means CUDA graphs) that ``generate`` also honours on CPU."""
    kwargs.setdefault("fullgraph", True)
    kwargs.setdefault("dynamic", False)
    kwargs.setdefault("mode", "default")
    config = CompileConfig(**kwargs)
    config._compile_all_devices = True  # transformers' switch for devices other than GPUs
    return config


def compiled_generate_kwargs(**compile_kwargs: Any) -> dict[str, Any]:
    """``{"cache_implementation": "static", "compile_config": cpu_compile_config(...)}``: the ``generate``
    arguments of a compiled decode step."""
    return {"cache_implementation": "static", "compile_config": cpu_compile_config(**compile_kwargs)}
