"""Weight quantization: `core` (scheme math, packing), `methods` (the method table), `calibrated` (the
layer-by-layer pipeline), `modules` (`QuantLinear`, `QuantExperts`) and `kernels`. The HF quantizer is in
`integration`."""

from .core.packing import pack, unpack
from .core.scheme import QuantizedWeight, dequantize_codes, fake_quantize, quantize_weight
from .modules.experts import QuantExperts
from .modules.linear import QuantLinear

__all__ = [
    "QuantExperts",
    "QuantLinear",
    "QuantizedWeight",
    "dequantize_codes",
    "fake_quantize",
    "pack",
    "quantize_weight",
    "unpack",
]
