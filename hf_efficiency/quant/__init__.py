"""Weight quantization: scheme math, packing, `QuantLinear`, kernels and the HF quantizer."""

from .core.packing import pack, unpack
from .core.scheme import QuantizedWeight, dequantize_codes, fake_quantize, quantize_weight
from .modules.linear import QuantLinear

__all__ = ["QuantLinear", "QuantizedWeight", "dequantize_codes", "fake_quantize", "pack", "quantize_weight", "unpack"]
