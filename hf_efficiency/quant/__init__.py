"""Weight quantization: scheme math, packing, `QuantLinear`, kernels and the HF quantizer."""

from .linear import QuantLinear
from .packing import pack, unpack
from .scheme import QuantizedWeight, dequantize_codes, fake_quantize, quantize_weight

__all__ = ["QuantLinear", "QuantizedWeight", "dequantize_codes", "fake_quantize", "pack", "quantize_weight", "unpack"]
