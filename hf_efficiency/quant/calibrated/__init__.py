"""hf_efficiency.quant.calibrated."""
