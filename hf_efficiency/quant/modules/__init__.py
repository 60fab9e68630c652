"""The nn.Modules that hold quantized tensors and run them: `QuantLinear` (owns its tensors and every
derived kernel layout), `FakeQuantLinear` for quantization-aware training, and the structure swap of a
model's linears (`replace`)."""
