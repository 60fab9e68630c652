"""hf_efficiency.integration."""
