"""`QuantLinear`: a linear layer whose weight is stored as packed low-bit integers.

State (the checkpoint keys, so a saved model reloads by name):

* ``weight``: int32 ``[out, ceil(in/32) * bits]`` packed codes (see :mod:`.packing`)
* ``weight_scale``: ``[out, G]`` per-group scales
* ``weight_min``: ``[out, G]`` per-group minima (asymmetric schemes with ``zero_point="float"`` only):
  ``w = u * scale + min``
* ``weight_zero``: uint8 ``[out, G]`` per-group integer zero points in ``[0, 2**bits - 1]`` (asymmetric
  schemes with ``zero_point="integer"`` only, the GPTQ/AWQ grid): ``w = (u - zero) * scale``
* ``bias``: float, as in the original layer
* ``weight_outlier_index`` / ``weight_outlier_value``: ``[out, k]`` column indices (int16, or
  int32 beyond 32767 columns) and float16 values of the weights kept exactly (outlier keeping)
* ``input_scale``: scalar float32 activation scale (static int8 activations only)
* ``weight_perm``: int32 ``[in]`` (act-order checkpoints only, e.g. GPTQ ``desc_act``): stored column
  ``j`` holds input feature ``weight_perm[j]``, so each group's columns stay contiguous
* ``input_rotation``: int8 ``[in]`` signs ``s`` of an online Hadamard rotation of the input (``quantization.rotation
  ="hadamard"``): the module computes ``hadamard_transform(x, s) @ W^T`` with the stored (rotated) ``W``

The module does not know which algorithm produced its tensors.

The module owns its state: code outside it changes these tensors only through `QuantLinear.replace_tensors`,
`QuantLinear.load_quantized`, `QuantLinear.set_input_scale`, `QuantLinear.set_storage_dtypes`,
``load_state_dict`` and ``.to()``. Each of them drops the derived kernel layouts (repacked codes,
CUDA layouts, int8 copies) that :mod:`..kernels.dispatch` caches beside the module, as does assigning a
new parameter to one of the names above; the layouts are reached only through `QuantLinear.kernel_layout`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from ...constants import SCALE_DTYPES
from ..core.hadamard import hadamard_transform, has_hadamard, rotation_matrix
from ..core.outliers import outlier_index_dtype
from ..core.packing import packed_words
from ..core.scheme import ZERO_POINTS, QuantizedWeight, num_groups, quantize_weight
from ..kernels import dispatch as kernels

_SCALE_TORCH_DTYPES = {name: getattr(torch, name) for name in SCALE_DTYPES}
ACT_MODES = (None, "dynamic", "static")
#: the tensors of the module (its checkpoint keys); `QuantLinear.replace_tensors` takes them as keywords
TENSOR_NAMES = (
    "weight",
    "weight_scale",
    "weight_min",
    "weight_zero",
    "weight_outlier_index",
    "weight_outlier_value",
    "weight_perm",
    "bias",
    "input_scale",
    "input_rotation",
)
_TENSOR_NAME_SET = frozenset(TENSOR_NAMES)
_INDEX_TENSORS = ("weight_outlier_index", "weight_perm")  # values must be column indices
#: the tensors `QuantLinear.check_values` checks (all but the packed codes, which any bit pattern is valid for)
_CHECKED_ON_LOAD = tuple(name for name in TENSOR_NAMES if name != "weight")
_T = TypeVar("_T")


def scale_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a scale dtype name (``quantization.scale_dtype``)."""
    return _SCALE_TORCH_DTYPES[name]


def outlier_count(in_features: int, fraction: float) -> int:
    """Weights kept per row for an outlier ``fraction`` (at least one when enabled)."""
    return 0 if fraction <= 0 else max(1, math.ceil(fraction * in_features - 1e-9))


def _check_finite(name: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: values must be finite (found inf or NaN)")


class QuantLinear(nn.Module):
    """Linear layer with packed ``bits``-bit weights, group-wise scales and optional minima or integer
    zero points.

    ``zero_point`` (asymmetric modules): ``"float"`` stores a float minimum per group (``weight_min``, in
    the scale dtype), ``"integer"`` an integer zero point (``weight_zero``, uint8). Symmetric modules have
    neither (``zero_point`` is ``"float"``; asking for ``"integer"`` with ``symmetric=True`` raises)."""

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
        zero_point: str = "float",
        input_rotation: bool = False,
    ) -> None:
        super().__init__()
        self._kernel_cache: dict[str, Any] = {}  # derived layouts, never saved (see `kernel_layout`)
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode={act_mode!r} is not allowed; allowed values: None, 'dynamic', 'static'")
        if act_mode is not None and (bits != 8 or group_size is not None or not symmetric):
            raise ValueError("int8 activations need 8-bit symmetric per-channel weights")
        if zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point={zero_point!r} is not allowed; allowed values: {', '.join(ZERO_POINTS)}")
        if symmetric and zero_point == "integer":
            raise ValueError(
                "zero_point='integer' is not allowed with symmetric=True (a symmetric grid has the implicit zero "
                "point 2**(bits-1)); allowed values: 'float'"
            )
        self.zero_point = zero_point
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
        if symmetric or zero_point == "integer":
            self.register_parameter("weight_min", None)
        else:
            self.weight_min = nn.Parameter(
                torch.empty(out_features, groups, dtype=scale_dtype, device=device), requires_grad=False
            )
        if zero_point == "integer":
            self.weight_zero = nn.Parameter(
                torch.empty(out_features, groups, dtype=torch.uint8, device=device), requires_grad=False
            )
        else:
            self.register_parameter("weight_zero", None)
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
        if input_rotation:
            if not has_hadamard(in_features):
                raise ValueError(f"input_rotation: no Hadamard matrix of order {in_features} is built here")
            self.input_rotation = nn.Parameter(
                torch.ones(in_features, dtype=torch.int8, device=device), requires_grad=False
            )
        else:
            self.register_parameter("input_rotation", None)

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
        zero_point: str = "float",
    ) -> "QuantLinear":
        """Quantize a float ``nn.Linear`` with round-to-nearest (and the optional clip search)."""
        q = quantize_weight(
            linear.weight,
            bits,
            group_size,
            symmetric,
            clip,
            clip_grid,
            clip_max_shrink,
            scale_dtype,
            zero_point=zero_point,
        )
        return cls.from_quantized(linear, q, symmetric=symmetric)

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Linear,
        q: QuantizedWeight,
        *,
        symmetric: bool,
        act_mode: str | None = None,
        input_rotation: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """A module holding ``q`` (any algorithm's result) with ``linear``'s bias (integer zero points when
        ``q`` has them). ``input_rotation``: the signs of an online Hadamard rotation of the input that ``q``'s
        weight was rotated for (see `hadamard_transform`)."""
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
            zero_point="integer" if q.zero is not None else "float",
            input_rotation=input_rotation is not None,
        )
        module.load_quantized(q)
        if input_rotation is not None:
            module.replace_tensors(input_rotation=input_rotation)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def load_quantized(self, q: QuantizedWeight) -> None:
        """Copy a :class:`QuantizedWeight` into this module's tensors (shapes must match; all checks run
        before anything changes). The scales and minima take ``q``'s dtype; the cached kernel layouts are
        dropped."""
        if (q.bits, q.group_size, q.in_features) != (self.bits, self.group_size, self.in_features):
            raise ValueError(
                f"quantized weight (bits={q.bits}, group_size={q.group_size}, in={q.in_features}) does not fit "
                f"{self.extra_repr()}"
            )
        if tuple(q.packed.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"weight: packed shape {tuple(q.packed.shape)} does not match the module's {tuple(self.weight.shape)}"
            )
        if self.weight_min is not None and q.minimum is None:
            raise ValueError("asymmetric QuantLinear needs a minimum tensor")
        if (self.weight_zero is None) != (q.zero is None):
            raise ValueError(
                "quantized weight and module disagree on integer zero points "
                f"(weight: {'integer' if q.zero is not None else 'none'}, module: zero_point={self.zero_point!r}, "
                f"symmetric={self.symmetric})"
            )
        if q.zero is not None:
            self._check_zero("weight_zero", q.zero)
        k = 0 if q.outlier_index is None else q.outlier_index.shape[1]
        if k != self.outliers:
            raise ValueError(f"quantized weight keeps {k} outliers per row; this module holds {self.outliers}")
        if (q.perm is None) != (self.weight_perm is None):
            raise ValueError("quantized weight and module disagree on act-order (a column permutation)")
        _check_finite("weight_scale", q.scale)
        if self.weight_min is not None:
            _check_finite("weight_min", q.minimum)
        if k:
            _check_finite("weight_outlier_value", q.outlier_value)
        self.weight.data = q.packed.to(self.weight.device)
        self.weight_scale.data = q.scale.to(self.weight_scale.device)
        if self.weight_min is not None:
            self.weight_min.data = q.minimum.to(self.weight_min.device)
        if self.weight_zero is not None:
            self.weight_zero.data = q.zero.to(device=self.weight_zero.device, dtype=torch.uint8).contiguous()
        if k:
            self.weight_outlier_index.data = q.outlier_index.to(self.weight_outlier_index.dtype).to(self.weight.device)
            self.weight_outlier_value.data = q.outlier_value.to(torch.float16).to(self.weight.device)
        if q.perm is not None:
            self.weight_perm.data = q.perm.to(torch.int32).to(self.weight.device)
        self.invalidate_kernel_cache()

    def replace_tensors(
        self,
        *,
        weight: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
        weight_min: torch.Tensor | None = None,
        weight_zero: torch.Tensor | None = None,
        weight_outlier_index: torch.Tensor | None = None,
        weight_outlier_value: torch.Tensor | None = None,
        weight_perm: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        input_rotation: torch.Tensor | None = None,
    ) -> None:
        """Replace the given tensors (``None``: keep) with copies of the values, all or none of them.

        Each value must have the current tensor's shape, dtype and device; float values must be finite
        (``input_scale`` positive too), index values (``weight_outlier_index``, ``weight_perm``)
        columns in ``[0, in_features)``, zero points (``weight_zero``) in ``[0, 2**bits - 1]`` and rotation signs
        (``input_rotation``) -1 or 1. Otherwise a ``ValueError`` naming the tensor is raised and the
        module is unchanged. The cached kernel layouts are dropped.
        """
        given = {
            "weight": weight,
            "weight_scale": weight_scale,
            "weight_min": weight_min,
            "weight_zero": weight_zero,
            "weight_outlier_index": weight_outlier_index,
            "weight_outlier_value": weight_outlier_value,
            "weight_perm": weight_perm,
            "bias": bias,
            "input_scale": input_scale,
            "input_rotation": input_rotation,
        }
        given = {name: value for name, value in given.items() if value is not None}
        for name, value in given.items():
            self._check_replacement(name, value)
        for name, value in given.items():
            getattr(self, name).data = value.detach().clone(memory_format=torch.contiguous_format)
        self.invalidate_kernel_cache()

    def _check_replacement(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        if current is None:
            raise ValueError(f"{name}: this QuantLinear has no such tensor ({self.extra_repr()})")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.shape != current.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the module's {tuple(current.shape)}")
        if value.dtype != current.dtype:
            raise ValueError(f"{name}: dtype {value.dtype} does not match the module's {current.dtype}")
        if value.device != current.device:
            raise ValueError(f"{name}: device {value.device} does not match the module's {current.device}")
        if value.device.type == "meta" or value.numel() == 0:
            return
        if value.is_floating_point():
            _check_finite(name, value)
            if name == "input_scale" and not bool((value > 0).all()):
                raise ValueError(f"input_scale: must be positive, got {value.item()}")
        elif name in _INDEX_TENSORS and (int(value.min()) < 0 or int(value.max()) >= self.in_features):
            raise ValueError(f"{name}: values must be column indices in [0, {self.in_features})")
        elif name == "weight_zero":
            self._check_zero(name, value)
        elif name == "input_rotation" and not bool((value.abs() == 1).all()):
            raise ValueError("input_rotation: the signs of a Hadamard rotation must all be -1 or 1")

    def _check_zero(self, name: str, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(self.weight_scale.shape):
            raise ValueError(
                f"{name}: shape {tuple(value.shape)} does not match the module's {tuple(self.weight_scale.shape)}"
            )
        if value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
        if (
            value.device.type != "meta"
            and value.numel()
            and (int(value.min()) < 0 or int(value.max()) > 2**self.bits - 1)
        ):
            raise ValueError(
                f"{name}: zero points must be integers in [0, {2**self.bits - 1}] for {self.bits}-bit codes"
            )

    def check_values(self) -> None:
        """Check the values the module holds as `replace_tensors` checks new ones (float tensors finite,
        ``input_scale`` positive, column indices in range, zero points on the grid); raise a ``ValueError``
        naming the first bad tensor. Cheap next to loading: the packed codes are not read. Loading a checkpoint
        calls it, so a corrupt scale is an error, not NaN (or silently wrong) logits."""
        for name in _CHECKED_ON_LOAD:
            value = getattr(self, name)
            if value is not None:
                self._check_replacement(name, value)

    def set_input_scale(self, scale: torch.Tensor | float) -> None:
        """Set the static activation scale (``act_mode="static"``) to ``scale``: a positive finite number or
        one-element tensor, stored as a float32 scalar on the module's device."""
        if self.input_scale is None:
            raise ValueError(
                f"input_scale: this QuantLinear has no static activation scale (act_mode={self.act_mode!r})"
            )
        value = torch.as_tensor(scale).detach()
        if value.numel() != 1:
            raise ValueError(f"input_scale: expected one value, got shape {tuple(value.shape)}")
        self.replace_tensors(input_scale=value.to(device=self.input_scale.device, dtype=torch.float32).reshape(()))

    def storage_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of each tensor holding the quantized weight (and ``input_scale``), by name; ``bias``
        is left out (an ordinary float parameter). For `set_storage_dtypes`."""
        return {name: t.dtype for name in TENSOR_NAMES if name != "bias" and (t := getattr(self, name)) is not None}

    def set_storage_dtypes(self, dtypes: Mapping[str, torch.dtype]) -> None:
        """Convert the named tensors to the given dtypes (``Tensor.to`` rounding; e.g. put float16 scales
        back after a float32 upcast, which round-trips exactly). Drops the cached kernel layouts."""
        converted = {}
        for name, dtype in dtypes.items():
            current = getattr(self, name) if name in _TENSOR_NAME_SET else None
            if current is None:
                raise ValueError(f"{name}: this QuantLinear has no such tensor ({self.extra_repr()})")
            value = current.detach().to(dtype)
            _check_finite(name, value)
            converted[name] = value
        if "weight_zero" in converted and converted["weight_zero"].dtype != torch.uint8:
            raise ValueError(
                f"weight_zero: dtype {converted['weight_zero'].dtype} is not allowed; allowed values: torch.uint8"
            )
        if self.weight_min is not None:
            scale_dtype = converted.get("weight_scale", self.weight_scale).dtype
            min_dtype = converted.get("weight_min", self.weight_min).dtype
            if scale_dtype != min_dtype:
                raise ValueError(f"weight_min: dtype {min_dtype} must be weight_scale's ({scale_dtype})")
        for name, value in converted.items():
            getattr(self, name).data = value
        self.invalidate_kernel_cache()

    def invalidate_kernel_cache(self) -> None:
        """Drop every kernel layout derived from this module's tensors (they are rebuilt on the next call)."""
        self._kernel_cache.clear()

    def kernel_layout(self, key: str, build: Callable[[], _T] | None = None) -> _T | None:
        """The kernel layout cached under ``key`` (:mod:`..kernels.dispatch` names them); when there is
        none, ``build()`` makes and caches it, or ``None`` is returned without ``build``. Layouts are
        held beside the module, never in its state dict, and dropped whenever one of its tensors changes."""
        lay = self._kernel_cache.get(key)
        if lay is None and build is not None:
            lay = build()
            if not self.offloaded:
                self._kernel_cache[key] = lay
        return lay

    @property
    def offloaded(self) -> bool:
        """Whether accelerate offloads this module's tensors (``device_map`` with CPU or disk offload: its hook
        loads them for each forward and returns them to ``meta`` after). Kernel layouts of an offloaded module
        are built for the call and not kept, so that offloading saves their memory too."""
        hook = getattr(self, "_hf_hook", None)
        return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)) if h is not None)

    def kernel_layout_nbytes(self, device_type: str, dtype: torch.dtype) -> int:
        """Bytes of the kernel layout this module caches beside its packed weight for ``dtype`` activations
        on ``device_type`` (``"cpu"``, ``"cuda"``), without building it (used by the memory estimator)."""
        path = kernels.path_for(self, device_type, dtype)
        n = self.in_features * self.out_features
        if path in ("cuda_int8", "w8a8"):
            return n + self.out_features * 4
        if path == "cuda_int4":
            return n // 2 + self.weight_scale.numel() * 2 * 2
        if path == "cpu_fused":
            from ..kernels.cpu import layout_bytes

            return layout_bytes(self)
        return 0

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this module computes with."""
        return kernels.dequantize_weight(self, dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=self.weight.device, dtype=dtype
        )
        with torch.no_grad():
            w = self.dequantize_weight(torch.float32)
            if self.input_rotation is not None:  # the float weight on the unrotated input: W R^T
                r = rotation_matrix(self.in_features, self.input_rotation.detach().cpu()).to(w.device)
                w = (w.double() @ r.T).float()
            linear.weight.copy_(w.to(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.to(dtype))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = hadamard_transform(x, self.input_rotation)
        return kernels.quant_linear_forward(self, x)

    def _apply(self, fn, recurse=True):  # device and dtype moves invalidate kernel layouts
        self.invalidate_kernel_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # load_state_dict: in place or assign=True
        self.invalidate_kernel_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:  # ``module.weight_scale = nn.Parameter(...)``
        if name in _TENSOR_NAME_SET and "_kernel_cache" in self.__dict__:
            self._kernel_cache.clear()
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles rebuild their own layouts
        state = super().__getstate__()
        state["_kernel_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kernel_cache = {}

    @property
    def storage_bits_per_weight(self) -> float:
        """Bits actually stored per weight, scales and minima (or zero points) included."""
        tensors = (
            self.weight,
            self.weight_scale,
            self.weight_min,
            self.weight_zero,
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
        extra += ", zero_point='integer'" if self.weight_zero is not None else ""
        extra += ", input_rotation='hadamard'" if self.input_rotation is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}{extra}"
        )
