"""Constants shared across the package, defined once (a leaf module: it imports nothing)."""

#: The integration name: ``quantization_config.quant_method`` of every checkpoint we write.
QUANT_METHOD = "hf_efficiency"

#: Widths the quantization methods produce (``quantization.bits``, ``module_bits``, ``bits_choices``).
QUANT_BITS: tuple[int, ...] = (8, 4, 3, 2)
#: Widths a stored module may have (community formats add 5- and 6-bit codes).
STORAGE_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
#: Widths of the quantized KV cache.
KV_BITS: tuple[int, ...] = (8, 4, 2)
#: Storage dtypes of scales and minima, by name.
SCALE_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")

#: ``quantization.rotation`` values besides None: QuaRot with online Hadamard rotations, folded rotations only
ROTATIONS = ("hadamard", "hadamard-folded")

__all__ = ["KV_BITS", "QUANT_BITS", "QUANT_METHOD", "ROTATIONS", "SCALE_DTYPES", "STORAGE_BITS"]
