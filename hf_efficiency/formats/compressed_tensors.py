"""Reader of compressed-tensors checkpoint folders (llm-compressor's output,
``quant_method="compressed-tensors"``) into our packed format, keeping their bits exactly.

Which linears are quantized, and how, comes from ``config_groups`` (each a scheme with
``targets``: exact module names, ``re:`` regexes matched from the start, or class names such as
``"Linear"``) minus ``ignore``, with compressed-tensors' precedence (exact name, then regex, then
class; the first group listing the winning target). The layouts, verified against
compressed-tensors 0.20.1 (``compressors/pack_quantized/{base,helpers}.py``,
``compressors/naive_quantized/base.py``, ``quantization/lifecycle/forward.py``):

* quantized values are signed, ``q in [-2**(b-1), 2**(b-1) - 1]``, and
  ``w = (q - zero_point) * weight_scale`` (zero point signed too, absent when symmetric);
  so with unsigned codes ``u = q + 2**(b-1)`` and zeros ``z + 2**(b-1)`` it is our
  ``(u - zero) * scale``: symmetric schemes are our symmetric format bit for bit.
* ``"pack-quantized"``: ``weight_packed`` int32 ``[out, ceil(in*b/32)]`` holds ``u`` as a
  little-endian bit stream per row (8 per word for 4 bits, 4 for 8 bits): for ``in % 32 == 0``
  exactly our ``packed``. ``weight_shape`` int ``[2]`` = ``(out, in)``. ``weight_zero_point``
  (asymmetric group/channel) is packed the same way along the OUTPUT dimension,
  int32 ``[ceil(out*b/32), G]`` (older releases stored it unpacked, int8 ``[out, G]``: both read).
  Only 2, 4 and 8 bits are read: for other widths releases before the dense packing put
  ``32 // b`` values in a word with padding bits, and the files do not say which layout they use.
* ``"naive-quantized"`` / ``"int-quantized"`` (weights only): ``weight`` int8 ``[out, in]`` holds ``q``.
* ``weight_scale`` ``[out, G]`` (group), ``[out, 1]`` (channel) or ``[1]`` (tensor), in the model's
  dtype; ``weight_g_idx`` int32 ``[in]`` (actorder ``"group"`` of older releases): the group of each
  input feature, read as GPTQ's ``g_idx`` (our ``weight_perm``).

Exactness and storage are as for GPTQ (see :mod:`.gptq`): symmetric schemes keep their scales
(``b + 16/g`` bits per weight with 16-bit scales); asymmetric ones keep their integer zero points
(``zero_point="integer"``: uint8 zeros, scales unchanged, ``b + 24/g`` bits per weight with 16-bit
scales; our float32 dequantization is exactly ``(q - z) * scale``). compressed-tensors' own
decompression computes ``(q - z) * scale`` in the scale dtype, i.e. our float32 weight rounded to it.

Not read (`FormatError` naming the format or feature): ``float-quantized`` (FP8),
``nvfp4/mxfp4/mxfp6/mxfp8`` formats, ``marlin-24`` and sparse formats, ``dense`` (fake-quantized
float weights), activation / output / KV-cache quantization, transforms (rotations), block
strategy, and widths other than 2/4/8 (pack-quantized) or up to 8 (naive).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..quant.core.packing import STORAGE_BITS, packed_words, unpack
from ..quant.core.scheme import QuantizedWeight, num_groups
from .common import FormatError
from .folder_tensors import FolderTensors, expect, model_linears
from .gptq import SCALE_TORCH_DTYPES, Collector, Result, act_order_perm, exact_weight, finite_scales

PACKED_BITS = (2, 4, 8)
SUPPORTED_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized")
_STRATEGIES = ("tensor", "channel", "group")
_MODULE_KEYS = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx")


def unpack_dense(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes ``[..., n]`` of compressed-tensors' dense packing (``ceil(n*bits/32)`` words per row), for
    widths dividing 32: the same bit stream as ours, only without our padding to whole 32-code blocks."""
    pad = -words.shape[-1] % bits
    if pad:
        words = torch.nn.functional.pad(words, (0, pad))
    return unpack(words, bits, n)


def _settings(quantization_config: dict) -> dict:
    qc = dict(quantization_config)
    if "config_groups" not in qc and isinstance(qc.get("quantization_config"), dict):  # older nesting
        qc = dict(qc["quantization_config"])
    return qc


def _check_targets(targets: Any, key: str, source: str) -> list[str]:
    if targets is None:
        return []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise FormatError(f"{source}: compressed-tensors {key} must be a list of strings, got {targets!r:.100}")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except (re.error, RecursionError, OverflowError) as e:
                raise FormatError(f"{source}: compressed-tensors {key} entry {t!r:.100} is not a regex ({e})") from None
    return targets


def _check_settings(qc: dict, source: str) -> tuple[dict[str, dict], list[str]]:
    """``(config_groups, ignore)`` after checking the types of every field the reader looks at."""
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{source}: compressed-tensors quantization_config has no config_groups (nothing quantized)")
    for group, scheme in groups.items():
        if not isinstance(scheme, dict):
            raise FormatError(f"{source}: compressed-tensors config_groups[{group!r:.100}] must be an object")
        _check_targets(scheme.get("targets"), f"config_groups[{group!r:.100}].targets", source)
        if scheme.get("weights") is not None and not isinstance(scheme["weights"], dict):
            raise FormatError(f"{source}: compressed-tensors config_groups[{group!r:.100}].weights must be an object")
        if scheme.get("format") is not None and not isinstance(scheme["format"], str):
            raise FormatError(f"{source}: compressed-tensors config_groups[{group!r:.100}].format must be a string")
    for key in ("sparsity_config",):
        if qc.get(key) is not None and not isinstance(qc[key], dict):
            raise FormatError(f"{source}: compressed-tensors {key} must be an object, got {qc[key]!r:.100}")
    if qc.get("format") is not None and not isinstance(qc["format"], str):
        raise FormatError(f"{source}: compressed-tensors format must be a string, got {qc['format']!r:.100}")
    return groups, _check_targets(qc.get("ignore"), "ignore", source)


def _target_matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__ if issubclass(c, nn.Module))


def scheme_for(name: str, module: nn.Module, groups: dict[str, dict], ignore: list[str]) -> dict | None:
    """The ``config_groups`` scheme compressed-tensors applies to module ``name`` (``None``: none)."""
    if any(_target_matches(name, module, t) for t in ignore):
        return None
    target_to_scheme: OrderedDict[str, dict] = OrderedDict()
    for scheme in groups.values():
        for target in scheme.get("targets") or []:
            target_to_scheme[target] = scheme
    targets = sorted(target_to_scheme, key=lambda t: ("re:" in t, t))
    by_name = [t for t in targets if (re.match(t[3:], name) is not None if t.startswith("re:") else t == name)]
    by_class = [t for t in targets if t not in by_name and _target_matches(name, module, t)]
    matched = by_name + by_class
    return target_to_scheme[matched[0]] if matched else None


def read_compressed_tensors(folder, quantization_config: dict, model_config, model_class=None) -> Result:
    """``(state_dict, formats, float_linears)`` of a compressed-tensors folder (see the module docstring)."""
    source = f"{folder}/config.json"
    qc = _settings(quantization_config)
    groups, ignore = _check_settings(qc, source)
    if qc.get("transform_config"):
        raise FormatError(f"{source}: compressed-tensors transforms (transform_config: rotations) are not supported")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise FormatError(f"{source}: compressed-tensors sparsity format {sparsity.get('format')!r} is not supported")
    if qc.get("moe_sparsity_config"):
        raise FormatError(f"{source}: compressed-tensors expert sparsity (moe_sparsity_config) is not supported")
    if qc.get("kv_cache_scheme"):
        raise FormatError(f"{source}: compressed-tensors KV-cache quantization (kv_cache_scheme) is not supported")
    global_format = qc.get("format")
    tensors = FolderTensors(folder)
    linears = model_linears(model_config, model_class, tensors)
    out = Collector(tensors, linears)
    for name, linear in linears.items():
        scheme = scheme_for(name, linear, groups, ignore)
        if scheme is None or not scheme.get("weights"):
            continue
        for kind in ("input_activations", "output_activations"):
            if scheme.get(kind):
                raise FormatError(
                    f"{source}: module {name}: compressed-tensors {kind} quantization is not supported "
                    "(weight-only schemes are read)"
                )
        fmt = scheme.get("format") or global_format
        if fmt not in SUPPORTED_FORMATS:
            raise FormatError(
                f"{source}: module {name}: compressed-tensors format {fmt!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_FORMATS)}"
            )
        args = _weight_args(scheme["weights"], fmt, name, source)
        q, symmetric = _ct_module(tensors, name, linear, args, fmt)
        out.add(name, q, symmetric)
        out.consumed.update(f"{name}.{k}" for k in _MODULE_KEYS)
        if fmt != "pack-quantized":
            out.consumed.add(f"{name}.weight")
        out.bias(name)
    stray = [k for k in tensors if k not in out.consumed and k.rpartition(".")[2] in _MODULE_KEYS]
    if stray:
        raise FormatError(
            f"{folder}: {tensors.where(stray[0])} is compressed but config_groups quantize no "
            "nn.Linear of that name (quantized embeddings or a config that disagrees with the tensors)"
        )
    return out.result()


def _weight_args(weights: dict, fmt: str, name: str, source: str) -> dict[str, Any]:
    where = f"{source}: module {name}"
    kind = str(weights.get("type", "int")).lower()
    bits = weights.get("num_bits", 8)
    if kind != "int":
        raise FormatError(f"{where}: compressed-tensors {kind} weights are not supported (integer weights only)")
    allowed = PACKED_BITS if fmt == "pack-quantized" else tuple(b for b in STORAGE_BITS if b <= 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise FormatError(
            f"{where}: {fmt} num_bits={bits!r} is not supported; supported: {', '.join(map(str, allowed))}"
        )
    group_size = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    strategy = str(strategy).lower()
    if strategy not in _STRATEGIES:
        raise FormatError(
            f"{where}: compressed-tensors weight strategy {strategy!r} is not supported; "
            f"supported: {', '.join(_STRATEGIES)}"
        )
    if strategy == "group" and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise FormatError(f"{where}: group strategy with group_size={group_size!r}")
    symmetric = weights.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise FormatError(f"{where}: compressed-tensors weights.symmetric={symmetric!r:.100} is not true or false")
    return {
        "bits": bits,
        "strategy": strategy,
        "group_size": group_size if strategy == "group" else None,
        "symmetric": symmetric,
    }


def _ct_module(
    tensors: FolderTensors, name: str, linear: nn.Linear, args: dict, fmt: str
) -> tuple[QuantizedWeight, bool]:
    n_in, n_out = linear.in_features, linear.out_features
    bits, strategy, group_size = args["bits"], args["strategy"], args["group_size"]
    groups = num_groups(n_in, group_size)
    half = 2 ** (bits - 1)
    what = (
        f" (compressed-tensors {fmt} int{bits}, {strategy}{'' if group_size is None else f' {group_size}'}, "
        f"{n_in} -> {n_out})"
    )
    scale_shape = (1,) if strategy == "tensor" else (n_out, groups)
    key = f"{name}.weight_scale"
    if key in tensors and strategy == "tensor" and tensors.shape(key) in ((), (1, 1)):
        scale_shape = tensors.shape(key)
    expect(tensors, key, scale_shape, SCALE_TORCH_DTYPES, what)
    scale = finite_scales(tensors, key)
    scale = scale.reshape(-1, 1).expand(n_out, 1) if strategy == "tensor" else scale

    zeros = None
    zkey = f"{name}.weight_zero_point"
    if zkey in tensors:
        zeros = _zero_points(tensors, zkey, bits, n_out, groups, strategy, what) + half
    elif not args["symmetric"]:
        raise FormatError(f"{tensors.folder}: tensor {zkey!r} is missing (asymmetric scheme){what}")

    perm = None
    gkey = f"{name}.weight_g_idx"
    if gkey in tensors:
        expect(tensors, gkey, (n_in,), (torch.int32, torch.int64), what)
        perm = act_order_perm(tensors.get(gkey), group_size, groups, f"{tensors.folder}: {tensors.where(gkey)}")

    if fmt == "pack-quantized":
        pkey = f"{name}.weight_packed"
        expect(tensors, pkey, (n_out, -(-n_in * bits // 32)), (torch.int32,), what)
        skey = f"{name}.weight_shape"
        if skey in tensors:
            expect(tensors, skey, (2,), (torch.int32, torch.int64), what)
            shape = [int(v) for v in tensors.get(skey).reshape(-1).tolist()]
            if shape != [n_out, n_in]:
                raise FormatError(f"{tensors.folder}: {tensors.where(skey)} is {shape}, expected {[n_out, n_in]}{what}")
        words = tensors.get(pkey)
        if perm is None and words.shape[1] == packed_words(n_in, bits):  # dense stream == our layout
            return exact_weight(None, zeros, scale, bits, group_size, n_in, packed=words.contiguous())
        codes = unpack_dense(words, bits, n_in)
    else:
        wkey = f"{name}.weight"
        expect(tensors, wkey, (n_out, n_in), (torch.int8,), what)
        q = tensors.get(wkey).to(torch.int16)
        if bool(((q < -half) | (q >= half)).any()):
            raise FormatError(f"{tensors.folder}: {tensors.where(wkey)} holds values outside int{bits}{what}")
        codes = (q + half).to(torch.uint8)
    return exact_weight(codes, zeros, scale, bits, group_size, n_in, perm=perm)


def _zero_points(
    tensors: FolderTensors, key: str, bits: int, n_out: int, groups: int, strategy: str, what: str
) -> torch.Tensor:
    """Signed zero points ``[out, G]`` (int32) from a packed (int32, along the output) or plain tensor."""
    half = 2 ** (bits - 1)
    shape, dtype = tensors.shape(key), tensors.dtype(key)
    if strategy == "tensor":
        if tuple(shape) not in ((1,), (), (1, 1)) or dtype not in (torch.int8, torch.int32):
            raise FormatError(
                f"{tensors.folder}: {tensors.where(key)} has shape {list(shape)} dtype "
                f"{tensors.dtype_name(key)}, expected one int8 value{what}"
            )
        z = tensors.get(key).reshape(1, 1).to(torch.int32).expand(n_out, 1)
    elif dtype == torch.int32 and tuple(shape) == (-(-n_out * bits // 32), groups):
        z = unpack_dense(tensors.get(key).t().contiguous(), bits, n_out).t().to(torch.int32) - half
    elif tuple(shape) == (n_out, groups) and dtype in (
        torch.int8,
        torch.int32,
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raw = tensors.get(key)
        z = raw.to(torch.int32)
        if raw.is_floating_point() and not torch.equal(z.to(raw.dtype), raw):
            raise FormatError(f"{tensors.folder}: {tensors.where(key)} holds non-integer zero points{what}")
    else:
        raise FormatError(
            f"{tensors.folder}: {tensors.where(key)} has shape {list(shape)} dtype "
            f"{tensors.dtype_name(key)}, expected int32 {[-(-n_out * bits // 32), groups]} (packed) "
            f"or int8 {[n_out, groups]}{what}"
        )
    if bool(((z < -half) | (z >= half)).any()):
        raise FormatError(f"{tensors.folder}: {tensors.where(key)} holds zero points outside int{bits}{what}")
    return z
