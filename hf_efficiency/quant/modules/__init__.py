"""hf_efficiency.quant.modules."""
