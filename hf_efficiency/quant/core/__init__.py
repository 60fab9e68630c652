"""hf_efficiency.quant.core."""
