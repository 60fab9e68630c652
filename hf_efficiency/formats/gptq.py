"""Readers of GPTQ and AWQ checkpoint folders into our packed format, keeping their bits exactly.

Which linears are quantized is read from the tensors (a ``<module>.qweight`` marks one); the
config gives the bit width and group size (GPTQModel's ``dynamic`` per-module overrides included).
Every shape is checked against the model the config describes before any data is read.

GPTQ (AutoGPTQ, GPTQModel, optimum; ``checkpoint_format`` / ``format`` ``"gptq"`` or ``"gptq_v2"``)
---------------------------------------------------------------------------------------------------
* ``qweight`` int32 ``[in*bits/32, out]``: column ``o`` is a little-endian bit stream of the codes
  ``q[i, o]`` along the input dimension (code ``i`` at stream bits ``[bits*i, bits*(i+1))``, 3-bit
  codes straddle words): for ``in % 32 == 0`` it is exactly our ``packed`` transposed.
* ``qzeros`` int32 ``[G, out*bits/32]``: the zero points packed the same way along the output
  dimension. ``"gptq"`` (v1) stores ``zero - 1``; ``"gptq_v2"`` stores ``zero``. A v1 stored value
  of ``2**bits - 1`` means a zero of ``2**bits`` (kept exactly as a float minimum, see below).
* ``scales`` ``[G, out]`` (float16), ``g_idx`` int32 ``[in]``: the group of each input feature.
  With act-order (``desc_act``) it is not monotone; the columns sorted (stably) by ``g_idx``
  become our ``weight_perm`` (every group must then hold ``group_size`` consecutive columns).
* ``bias``: AutoGPTQ writes one for every linear; an all-zero bias of a linear the model
  defines without bias is dropped (a nonzero one is an error).
* ``w[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``.

AWQ (AutoAWQ, ``quant_method="awq"``, 4-bit, ``zero_point=True``)
-----------------------------------------------------------------
* ``version="gemm"`` (``WQLinear_GEMM``): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32
  ``[G, out/8]`` packed along the OUTPUT dimension, nibble ``k`` of word ``c`` holding output
  ``8c + AWQ_ORDER[k]`` (``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``); ``scales`` ``[G, out]``.
* ``version="gemv"`` (``WQLinear_GEMV``): ``qweight`` int32 ``[out, in/8]`` packed along the input
  in natural nibble order (our layout); ``qzeros`` int32 ``[out, W]`` with the per-group zeros
  packed 8 per word in natural order; ``scales`` ``[out, 8W]`` whose first ``G`` columns are used
  (``W = calculate_zeros_width(in, group_size)``, padded as AutoAWQ pads it).
* ``w[o, i] = (q[o, i] - zero[o, g]) * scales[o, g]``, ``g = i // group_size``.
  (Layouts verified against AutoAWQ 0.2.9, ``awq/modules/linear/gemm.py`` and ``gemv.py``
  ``from_linear``, and ``awq/utils/packing_utils.py``.) Other versions (``gemv_fast``,
  ``marlin``, ``exllama``, ``ipex``) raise `FormatError`.

Exactness and storage
---------------------
When every zero equals ``2**(bits-1)`` (GPTQ ``sym=True``) the module is stored SYMMETRIC with the
float16 scales unchanged: ``(u - 2**(bits-1)) * scale`` is exactly the reference, at ``bits +
16/group_size`` bits per weight. Otherwise, when every zero lies in ``[0, 2**bits - 1]`` (always for
GPTQ v2, AWQ and compressed-tensors), it is stored with INTEGER ZERO POINTS (``zero_point="integer"``):
the uint8 zeros and the scales unchanged, ``bits + 24/group_size`` bits per weight (4.19 for 4-bit,
group 128, against the checkpoint's 4.16 with its zeros packed to 4 bits), and the float32
dequantization ``u * scale + (-zero * scale)`` is exactly ``scale * (q - zero)`` for 16-bit scales. Only a
GPTQ v1 zero of ``2**bits`` (stored value ``2**bits - 1``, plus one) falls outside: such a module is
stored asymmetric with ``minimum = -zero * scale`` computed in float32 (exact for 16-bit scales: the
product has at most 20 significant bits), in the scales' own dtype when every minimum is exact in it,
else scale and minimum in float32 (``bits + 64/group_size`` bits per weight).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..quant.core.packing import pack, packed_words, unpack
from ..quant.core.scheme import QuantizedWeight, num_groups
from .common import FormatError, format_of, quantized_tensors
from .folder_tensors import FolderTensors, expect, model_linears

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_KEYS = ("qweight", "qzeros", "scales")
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm", "gemv")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
SCALE_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_PACK_CHUNK = 1024  # rows packed at a time (pack() expands each code to 8*bits bytes)

Result = tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], list[str]]


# ----------------------------------------------------------------------------- shared helpers


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` applied a block of rows at a time (bounded temporary memory)."""
    if codes.shape[0] <= _PACK_CHUNK:
        return pack(codes, bits)
    return torch.cat([pack(codes[i : i + _PACK_CHUNK], bits) for i in range(0, codes.shape[0], _PACK_CHUNK)])


def act_order_perm(g_idx: torch.Tensor, group_size: int | None, groups: int, where: str) -> torch.Tensor | None:
    """Our ``weight_perm`` for a per-input-feature group index (GPTQ ``g_idx``): the features sorted
    stably by group, so that stored column ``j`` holds feature ``perm[j]`` and every group's columns
    are contiguous. ``None`` when ``g_idx`` is the trivial ``i // group_size``. Raises `FormatError`
    unless every group then holds exactly the expected number of features."""
    g = g_idx.to(torch.int64).reshape(-1)
    n = g.numel()
    if n and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise FormatError(f"{where}: group indices must lie in [0, {groups}), found [{int(g.min())}, {int(g.max())}]")
    size = n if group_size is None else group_size
    expected = torch.arange(n, dtype=torch.int64) // max(size, 1)
    if torch.equal(g, expected):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        counts = torch.bincount(g, minlength=groups).tolist()
        raise FormatError(
            f"{where}: act-order group index does not give every group {size} features "
            f"(group sizes {counts[:8]}{' ...' if len(counts) > 8 else ''})"
        )
    return perm.to(torch.int32)


def exact_weight(
    codes: torch.Tensor | None,
    zeros: torch.Tensor | None,
    scale: torch.Tensor,
    bits: int,
    group_size: int | None,
    in_features: int,
    perm: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, bool]:
    """Our `QuantizedWeight` for ``w = (u - zero[g]) * scale[g]`` and whether it is symmetric.

    ``codes``: unsigned codes ``[out, in]`` in original input order (or ``None`` with ``packed``:
    our packed words, already in stored order); ``zeros``: integer zero points ``[out, G]`` (``None``:
    ``2**(bits-1)``); ``scale`` ``[out, G]``; ``perm``: act-order permutation (stored column ``j`` is
    feature ``perm[j]``). Symmetric when every zero is ``2**(bits-1)`` (scale kept as is); otherwise
    integer zero points (uint8 ``zero``, scale kept as is) when every zero is in ``[0, 2**bits - 1]``;
    otherwise ``minimum = -zero*scale`` in float32, kept in the scale's dtype when exactly representable.
    """
    if packed is None:
        if perm is not None:
            codes = codes.index_select(1, perm.to(torch.long))
        packed = pack_rows(codes, bits)
    half = 2 ** (bits - 1)
    scale = scale.contiguous()
    if zeros is None or bool((zeros == half).all()):
        return QuantizedWeight(packed, scale, None, bits, group_size, in_features, perm=perm), True
    if bool(((zeros >= 0) & (zeros <= 2**bits - 1)).all()):
        zero = zeros.to(torch.uint8).contiguous()
        return QuantizedWeight(packed, scale, None, bits, group_size, in_features, perm=perm, zero=zero), False
    s32 = scale.float()
    m32 = -(zeros.to(torch.float32) * s32)
    if scale.dtype != torch.float32 and torch.equal(m32.to(scale.dtype).float(), m32):
        scale_out, min_out = scale, m32.to(scale.dtype)
    else:
        scale_out, min_out = s32, m32
    return QuantizedWeight(packed, scale_out, min_out.contiguous(), bits, group_size, in_features, perm=perm), False


def finite_scales(tensors: FolderTensors, key: str) -> torch.Tensor:
    """Tensor ``key`` (a scale), which must be finite: a NaN or infinite scale is a corrupt checkpoint."""
    value = tensors.get(key)
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise FormatError(f"{tensors.folder}: {tensors.where(key)} holds non-finite scales; the checkpoint is corrupt")
    return value


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> 4-bit codes ``[..., W, 8]`` (nibble ``k`` = bits ``[4k, 4k+4)``), uint8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


class Collector:
    """Accumulates a reader's result; every file tensor not consumed passes through under its name."""

    def __init__(self, tensors: FolderTensors, linears: dict[str, nn.Linear]) -> None:
        self.tensors = tensors
        self.linears = linears
        self.state_dict: dict[str, torch.Tensor] = {}
        self.formats: dict[str, dict[str, Any]] = {}
        self.consumed: set[str] = set()

    def add(self, name: str, q: QuantizedWeight, symmetric: bool) -> None:
        self.state_dict.update(quantized_tensors(name, q))
        self.formats[name] = format_of(q, symmetric)

    def bias(self, name: str) -> None:
        """Keep ``<name>.bias`` when the model's linear has one; drop an all-zero bias otherwise."""
        key = f"{name}.bias"
        if key not in self.tensors:
            return
        self.consumed.add(key)
        bias = self.tensors.get(key)
        if self.linears[name].bias is not None:
            self.state_dict[key] = bias  # transformers casts it to the requested dtype
        elif bool((bias != 0).any()):
            raise FormatError(
                f"{self.tensors.folder}: {self.tensors.where(key)} is nonzero but the model's "
                f"{name} has no bias (config.json disagrees with the checkpoint)"
            )

    def refuse_strays(self, suffixes: tuple[str, ...]) -> None:
        """Raise `FormatError` for a tensor named like a quantized module's (``<module>.<suffix>``) that no
        module used: a renamed or corrupt entry would otherwise be dropped with a warning."""
        stray = [k for k in self.tensors if k not in self.consumed and k.rpartition(".")[2] in suffixes]
        if stray:
            raise FormatError(
                f"{self.tensors.folder}: {self.tensors.where(stray[0])} belongs to no quantized module of the "
                "model config.json describes (a renamed tensor, or a checkpoint for another model)"
            )

    def result(self) -> Result:
        for key in self.tensors:
            if key not in self.consumed and key not in self.state_dict:
                self.state_dict[key] = self.tensors.get(key)
        float_linears = [n for n in self.linears if n not in self.formats]
        return self.state_dict, self.formats, float_linears


def _quantized_names(tensors: FolderTensors, linears: dict[str, nn.Linear], suffix: str) -> list[str]:
    names = [k[: -len(suffix)] for k in tensors if k.endswith(suffix)]
    for name in names:
        if name not in linears:
            raise FormatError(
                f"{tensors.folder}: {tensors.where(name + suffix)} belongs to no nn.Linear of the "
                f"model config.json describes"
            )
    if not names:
        raise FormatError(f"{tensors.folder}: no tensor ending in {suffix!r}: not a quantized checkpoint of this kind")
    order = {n: i for i, n in enumerate(linears)}
    return sorted(names, key=order.__getitem__)


def _int(value: Any, key: str, source: str) -> int:
    """An integer config value: an int, an integral float (``4.0``) or a decimal string (``"4"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", value):
        return int(value)
    raise FormatError(f"{source}: quantization_config.{key}={value!r:.100} is not an integer")


def _group(value: Any, source: str) -> int | None:
    if value is None:
        return None
    g = _int(value, "group_size", source)
    if g == -1:
        return None
    if g < 1:
        raise FormatError(f"{source}: quantization_config.group_size={g} is not allowed (-1 or a positive integer)")
    return g


# ----------------------------------------------------------------------------- GPTQ


def _gptq_dynamic(dynamic: Any, source: str) -> list[tuple[re.Pattern, bool, dict]]:
    """GPTQModel's ``dynamic`` ``{pattern: overrides}`` checked and compiled: ``(regex, negative, overrides)``."""
    if dynamic is None:
        return []
    if not isinstance(dynamic, dict):
        raise FormatError(f"{source}: quantization_config.dynamic must be an object {{pattern: overrides}}")
    out = []
    for pattern, overrides in dynamic.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise FormatError(
                f"{source}: quantization_config.dynamic[{pattern!r:.100}] must be an object of overrides, "
                f"got {overrides!r:.100}"
            )
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            regex = re.compile(raw)
        except (re.error, RecursionError, OverflowError) as e:
            raise FormatError(f"{source}: quantization_config.dynamic pattern {pattern!r:.100} is not a regex ({e})")
        out.append((regex, pattern.startswith("-:"), dict(overrides or {})))
    return out


def _gptq_overrides(dynamic: list[tuple[re.Pattern, bool, dict]], name: str) -> dict | bool | None:
    """GPTQModel's ``dynamic``: the first pattern (``+:``/``-:`` prefixed or plain regex) that
    ``re.match``es ``name`` gives its overrides (``False`` for ``-:``: not quantized)."""
    for regex, negative, overrides in dynamic:
        if regex.match(name):
            return False if negative else overrides
    return None


def read_gptq(folder, quantization_config: dict, model_config, model_class=None) -> Result:
    """``(state_dict, formats, float_linears)`` of a GPTQ folder (see the module docstring)."""
    source = f"{folder}/config.json"
    qc = dict(quantization_config)
    if qc.get("is_marlin_format"):
        raise FormatError(f"{source}: GPTQ Marlin-format checkpoints (is_marlin_format=true) are not supported")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS:
        raise FormatError(
            f"{source}: GPTQ checkpoint_format={fmt!r} is not supported; supported: {', '.join(GPTQ_FORMATS)}"
        )
    pack_dtype = str(qc.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise FormatError(f"{source}: GPTQ pack_dtype={pack_dtype!r} is not supported; supported: int32")
    v1 = fmt == "gptq"
    act_order = qc.get("desc_act") is True
    dynamic = _gptq_dynamic(qc.get("dynamic") or None, source)
    tensors = FolderTensors(folder)
    linears = model_linears(model_config, model_class, tensors)
    out = Collector(tensors, linears)
    for name in _quantized_names(tensors, linears, ".qweight"):
        overrides = _gptq_overrides(dynamic, name) or {}
        bits = _int(overrides.get("bits", qc.get("bits")), "bits", source)
        if bits not in GPTQ_BITS:
            raise FormatError(
                f"{source}: GPTQ bits={bits} (module {name}) is not supported; supported: "
                f"{', '.join(map(str, GPTQ_BITS))}"
            )
        group_size = _group(overrides.get("group_size", qc.get("group_size", 128)), source)
        if act_order and f"{name}.g_idx" not in tensors:
            raise FormatError(
                f"{tensors.folder}: tensor {name + '.g_idx'!r} is missing, but quantization_config.desc_act is true "
                "(act-order checkpoints need each module's group index)"
            )
        q, symmetric = _gptq_module(tensors, name, linears[name], bits, group_size, v1)
        out.add(name, q, symmetric)
        out.consumed.update(f"{name}.{k}" for k in GPTQ_KEYS)
        out.bias(name)
    out.refuse_strays(GPTQ_KEYS)
    return out.result()


def _gptq_module(
    tensors: FolderTensors, name: str, linear: nn.Linear, bits: int, group_size: int | None, v1: bool
) -> tuple[QuantizedWeight, bool]:
    n_in, n_out = linear.in_features, linear.out_features
    groups = num_groups(n_in, group_size)
    what = f" (GPTQ {bits}-bit, group_size {group_size or -1}, {n_in} -> {n_out})"
    expect(tensors, f"{name}.qweight", (packed_words(n_in, bits), n_out), (torch.int32,), what)
    expect(tensors, f"{name}.qzeros", (groups, packed_words(n_out, bits)), (torch.int32,), what)
    expect(tensors, f"{name}.scales", (groups, n_out), SCALE_TORCH_DTYPES, what)
    perm = None
    if f"{name}.g_idx" in tensors:
        expect(tensors, f"{name}.g_idx", (n_in,), _INDEX_DTYPES, what)
        perm = act_order_perm(
            tensors.get(f"{name}.g_idx"), group_size, groups, f"{tensors.folder}: {tensors.where(name + '.g_idx')}"
        )
    qweight_t = tensors.get(f"{name}.qweight").t().contiguous()  # [out, words]: our layout, input order
    zeros = unpack(tensors.get(f"{name}.qzeros"), bits, n_out).t().to(torch.int32)  # [out, G]
    if v1:
        zeros = zeros + 1
    scale = finite_scales(tensors, f"{name}.scales").t()
    if perm is None and n_in % 32 == 0:
        return exact_weight(None, zeros, scale, bits, group_size, n_in, packed=qweight_t)
    return exact_weight(unpack(qweight_t, bits, n_in), zeros, scale, bits, group_size, n_in, perm=perm)


# ----------------------------------------------------------------------------- AWQ


def awq_zeros_width(in_features: int, group_size: int) -> int:
    """AutoAWQ ``calculate_zeros_width``: int32 words of GEMV zeros per output row."""
    multiplier = {64: 2, 32: 4}.get(group_size, 1 if group_size >= 128 else 0)
    if not multiplier:
        raise FormatError(f"AWQ GEMV has no layout for group_size {group_size} (AutoAWQ supports 32, 64, >= 128)")
    base = -(-(in_features // group_size) // 8)
    return -(-base // multiplier) * multiplier


def read_awq(folder, quantization_config: dict, model_config, model_class=None) -> Result:
    """``(state_dict, formats, float_linears)`` of an AutoAWQ folder (see the module docstring)."""
    source = f"{folder}/config.json"
    qc = dict(quantization_config)
    version = str(qc.get("version", "gemm")).lower()
    if version not in AWQ_VERSIONS:
        raise FormatError(f"{source}: AWQ version {version!r} is not supported; supported: {', '.join(AWQ_VERSIONS)}")
    bits = _int(qc.get("bits", qc.get("w_bit", 4)), "bits", source)
    if bits != 4:
        raise FormatError(f"{source}: AWQ bits={bits} is not supported; AutoAWQ's GEMM/GEMV layouts are 4-bit only")
    if not qc.get("zero_point", True):
        raise FormatError(f"{source}: AWQ zero_point=false is not supported (AutoAWQ's GEMM/GEMV layouts store zeros)")
    group_size = _group(qc.get("group_size", qc.get("q_group_size", 128)), source)
    tensors = FolderTensors(folder)
    linears = model_linears(model_config, model_class, tensors)
    out = Collector(tensors, linears)
    for name in _quantized_names(tensors, linears, ".qweight"):
        reader = _awq_gemm_module if version == "gemm" else _awq_gemv_module
        q, symmetric = reader(tensors, name, linears[name], group_size)
        out.add(name, q, symmetric)
        out.consumed.update(f"{name}.{k}" for k in AWQ_KEYS)
        out.bias(name)
    out.refuse_strays(AWQ_KEYS)
    return out.result()


def _awq_group(linear: nn.Linear, group_size: int | None, where: str) -> int:
    g = linear.in_features if group_size is None else group_size
    if linear.in_features % g or linear.out_features % 8:
        raise FormatError(
            f"{where}: AWQ needs in_features % group_size == 0 and out_features % 8 == 0 "
            f"({linear.in_features} -> {linear.out_features}, group_size {g})"
        )
    return g


def _awq_gemm_module(tensors: FolderTensors, name: str, linear: nn.Linear, group_size: int | None):
    n_in, n_out = linear.in_features, linear.out_features
    g = _awq_group(linear, group_size, f"{tensors.folder}: module {name}")
    groups = n_in // g
    what = f" (AWQ GEMM 4-bit, group_size {g}, {n_in} -> {n_out})"
    expect(tensors, f"{name}.qweight", (n_in, n_out // 8), (torch.int32,), what)
    expect(tensors, f"{name}.qzeros", (groups, n_out // 8), (torch.int32,), what)
    expect(tensors, f"{name}.scales", (groups, n_out), SCALE_TORCH_DTYPES, what)

    def along_output(words: torch.Tensor) -> torch.Tensor:  # [rows, out/8] -> [rows, out] in output order
        return unpack_nibbles(words)[..., list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], n_out)

    codes = along_output(tensors.get(f"{name}.qweight")).t().contiguous()  # [out, in]
    zeros = along_output(tensors.get(f"{name}.qzeros")).t().to(torch.int32)  # [out, G]
    scale = finite_scales(tensors, f"{name}.scales").t()
    return exact_weight(codes, zeros, scale, 4, None if group_size is None else g, n_in)


def _awq_gemv_module(tensors: FolderTensors, name: str, linear: nn.Linear, group_size: int | None):
    n_in, n_out = linear.in_features, linear.out_features
    g = _awq_group(linear, group_size, f"{tensors.folder}: module {name}")
    if n_in % 8:
        raise FormatError(f"{tensors.folder}: module {name}: AWQ GEMV needs in_features % 8 == 0 ({n_in})")
    groups = n_in // g
    width = awq_zeros_width(n_in, g)
    what = f" (AWQ GEMV 4-bit, group_size {g}, {n_in} -> {n_out})"
    expect(tensors, f"{name}.qweight", (n_out, n_in // 8), (torch.int32,), what)
    expect(tensors, f"{name}.qzeros", (n_out, width), (torch.int32,), what)
    expect(tensors, f"{name}.scales", (n_out, width * 8), SCALE_TORCH_DTYPES, what)
    qweight = tensors.get(f"{name}.qweight")
    zeros = unpack_nibbles(tensors.get(f"{name}.qzeros")).reshape(n_out, width * 8)[:, :groups].to(torch.int32)
    scale = finite_scales(tensors, f"{name}.scales")[:, :groups]
    gs = None if group_size is None else g
    if n_in % 32 == 0:  # 8 codes per word in natural order: our layout already
        return exact_weight(None, zeros, scale, 4, gs, n_in, packed=qweight.contiguous())
    codes = unpack_nibbles(qweight).reshape(n_out, n_in)
    return exact_weight(codes, zeros, scale, 4, gs, n_in)
