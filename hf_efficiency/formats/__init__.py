"""Readers of community compressed checkpoints (GGUF, GPTQ, AWQ, compressed-tensors) into our
quantized modules, keeping their bits. See :mod:`.common` for what the readers share."""
