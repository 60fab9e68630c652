"""The nn.Modules that hold quantized tensors and run them: `QuantLinear` (owns its tensors and every
derived kernel layout), `QuantExperts` (a layer's fused mixture-of-experts tensors, one `QuantLinear` per expert
matrix), `FakeQuantLinear` for quantization-aware training, and the structure swap of a model's linears and
experts (`replace`)."""
