"""hf_efficiency.quant.kernels."""
