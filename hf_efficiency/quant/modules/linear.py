"""`QuantLinear`: a linear layer whose weight is stored as packed low-bit integers.

State (the checkpoint keys, so a saved model reloads by name):

* ``weight``: int32 ``[out, ceil(in/32) * bits]`` packed codes (see :mod:`.packing`)
* ``weight_scale``: ``[out, G]`` per-group scales
* ``weight_min``: ``[out, G]`` per-group minima (asymmetric schemes only)
* ``bias``: float, as in the original layer
* ``weight_outlier_index`` / ``weight_outlier_value``: ``[out, k]`` column indices (int16, or
  int32 beyond 32767 columns) and float16 values of the weights kept exactly (outlier keeping)
* ``input_scale``: scalar float32 activation scale (static int8 activations only)
* ``weight_perm``: int32 ``[in]`` (act-order checkpoints only, e.g. GPTQ ``desc_act``): stored column
  ``j`` holds input feature ``weight_perm[j]``, so each group's columns stay contiguous

The module does not know which algorithm produced its tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.packing import packed_words
from ..core.scheme import QuantizedWeight, num_groups, quantize_weight
from ..kernels import dispatch as kernels

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ACT_MODES = (None, "dynamic", "static")


def scale_dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


def outlier_count(in_features: int, fraction: float) -> int:
    """Weights kept per row for an outlier ``fraction`` (at least one when enabled)."""
    return 0 if fraction <= 0 else max(1, math.ceil(fraction * in_features - 1e-9))


def outlier_index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


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
        outliers: int = 0,
        act_mode: str | None = None,
        act_order: bool = False,
    ) -> None:
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode={act_mode!r} is not allowed; allowed values: None, 'dynamic', 'static'")
        if act_mode is not None and (bits != 8 or group_size is not None or not symmetric):
            raise ValueError("int8 activations need 8-bit symmetric per-channel weights")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.outliers = int(outliers)
        self.act_mode = act_mode
        groups = num_groups(in_features, group_size)
        words = packed_words(in_features, bits)
        self.weight = nn.Parameter(
            torch.empty(out_features, words, dtype=torch.int32, device=device), requires_grad=False
        )
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
        if self.outliers:
            index_dtype = outlier_index_dtype(in_features)
            self.weight_outlier_index = nn.Parameter(
                torch.empty(out_features, self.outliers, dtype=index_dtype, device=device), requires_grad=False
            )
            self.weight_outlier_value = nn.Parameter(
                torch.empty(out_features, self.outliers, dtype=torch.float16, device=device), requires_grad=False
            )
        else:
            self.register_parameter("weight_outlier_index", None)
            self.register_parameter("weight_outlier_value", None)
        if act_mode == "static":
            self.input_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        else:
            self.register_parameter("input_scale", None)
        if act_order:
            self.weight_perm = nn.Parameter(
                torch.arange(in_features, dtype=torch.int32, device=device), requires_grad=False
            )
        else:
            self.register_parameter("weight_perm", None)

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
        return cls.from_quantized(linear, q, symmetric=symmetric)

    @classmethod
    def from_quantized(
        cls, linear: nn.Linear, q: QuantizedWeight, *, symmetric: bool, act_mode: str | None = None
    ) -> "QuantLinear":
        """A module holding ``q`` (any algorithm's result) with ``linear``'s bias."""
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=q.bits,
            group_size=q.group_size,
            symmetric=symmetric,
            scale_dtype=q.scale.dtype,
            bias_dtype=linear.weight.dtype,
            device=linear.weight.device,
            outliers=0 if q.outlier_index is None else q.outlier_index.shape[1],
            act_mode=act_mode,
            act_order=q.perm is not None,
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
        k = 0 if q.outlier_index is None else q.outlier_index.shape[1]
        if k != self.outliers:
            raise ValueError(f"quantized weight keeps {k} outliers per row; this module holds {self.outliers}")
        if k:
            self.weight_outlier_index.data = q.outlier_index.to(self.weight_outlier_index.dtype).to(self.weight.device)
            self.weight_outlier_value.data = q.outlier_value.to(torch.float16).to(self.weight.device)
        if (q.perm is None) != (self.weight_perm is None):
            raise ValueError("quantized weight and module disagree on act-order (a column permutation)")
        if q.perm is not None:
            self.weight_perm.data = q.perm.to(torch.int32).to(self.weight.device)
        self.__dict__.pop("_kernel_cache", None)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this module computes with."""
        return kernels.dequantize_weight(self, dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=self.weight.device, dtype=dtype
        )
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
        tensors = (
            self.weight,
            self.weight_scale,
            self.weight_min,
            self.weight_outlier_index,
            self.weight_outlier_value,
            self.weight_perm,
        )
        nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return 8.0 * nbytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        extra = f", outliers={self.outliers}" if self.outliers else ""
        extra += f", act_mode={self.act_mode!r}" if self.act_mode else ""
        extra += ", act_order=True" if self.weight_perm is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}{extra}"
        )
