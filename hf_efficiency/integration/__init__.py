"""The only layer that touches transformers', peft's and optimum's internals.

* `registry`: ``register()`` (the quantizer and config in transformers' registries, the
  ``efficiency_config=`` keyword of ``from_pretrained``, ``generate``'s speculative keywords, the
  attention functions, peft's dispatch of our modules, push_to_hub's model card) and the import hook
  that patches peft once it is imported.
* `quantizer`: the ``HfQuantizer`` of ``quant_method="hf_efficiency"`` (quantize while loading, the
  calibrated pipeline after loading, rebuild a saved checkpoint), `attach_quantizer`.
* `checkpoint`: safetensors header checks of a checkpoint before transformers loads it.
* `compressed_loading`: ``from_pretrained(..., keep_compressed=True)`` routed to the format readers.
* `qat`: ``convert_qat`` (the end of quantization-aware training, wired like a loaded model).
* `optimum`: ``OptimumQuantizer`` for optimum's quantizer interface.

Method packages (quant, formats, memory, distill, speculative, attention, peft) never import this
package: ``python tools/check_imports.py`` checks it.
"""
