"""`QuantLinear`: a linear layer whose weight is stored as packed low-bit integers.

State (the checkpoint keys, so a saved model reloads by name):

* ``weight``: int32 ``[out, ceil(in/32) * bits]`` packed codes (see :mod:`.packing`)
* ``weight_scale``: ``[out, G]`` per-group scales
* ``weight_min``: ``[out, G]`` per-group minima (asymmetric schemes only)
* ``bias``: float, as in the original layer

The module does not know which algorithm produced its tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .packing import packed_words
from .scheme import QuantizedWeight, num_groups, quantize_weight

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


class QuantLinear(nn.Module):
    """Linear layer with packed ``bits``-bit weights, group-wise scales and optional minima."""

    hf_efficiency_quantized = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = num_groups(in_features, group_size)
        words = packed_words(in_features, bits)
        self.weight = nn.Parameter(torch.empty(out_features, words, dtype=torch.int32, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, groups, dtype=scale_dtype, device=device), requires_grad=False
        )
        if symmetric:
            self.register_parameter("weight_min", None)
        else:
            self.weight_min = nn.Parameter(
                torch.empty(out_features, groups, dtype=scale_dtype, device=device), requires_grad=False
            )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        clip: str = "none",
        clip_grid: int = 20,
        clip_max_shrink: float = 0.5,
        scale_dtype: torch.dtype = torch.float16,
    ) -> "QuantLinear":
        """Quantize a float ``nn.Linear`` with round-to-nearest (and the optional clip search)."""
        q = quantize_weight(linear.weight, bits, group_size, symmetric, clip, clip_grid, clip_max_shrink, scale_dtype)
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            bias_dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        module.load_quantized(q)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def load_quantized(self, q: QuantizedWeight) -> None:
        """Copy a :class:`QuantizedWeight` into this module's tensors (shapes must match)."""
        if (q.bits, q.group_size, q.in_features) != (self.bits, self.group_size, self.in_features):
            raise ValueError(
                f"quantized weight (bits={q.bits}, group_size={q.group_size}, in={q.in_features}) does not fit "
                f"{self.extra_repr()}"
            )
        self.weight.data = q.packed.to(self.weight.device)
        self.weight_scale.data = q.scale.to(self.weight_scale.device)
        if self.weight_min is not None:
            if q.minimum is None:
                raise ValueError("asymmetric QuantLinear needs a minimum tensor")
            self.weight_min.data = q.minimum.to(self.weight_min.device)
        self.__dict__.pop("_kernel_cache", None)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this module computes with."""
        return kernels.dequantize_weight(self, dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.to(dtype))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quant_linear_forward(self, x)

    def _apply(self, fn, recurse=True):  # device moves invalidate kernel layouts
        self.__dict__.pop("_kernel_cache", None)
        return super()._apply(fn, recurse)

    @property
    def storage_bits_per_weight(self) -> float:
        """Bits actually stored per weight, scales and minima included."""
        nbytes = sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale, self.weight_min) if t is not None)
        return 8.0 * nbytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"
        )
