"""Writer of compressed-tensors folders (``quant_method: "compressed-tensors"``), what llm-compressor writes
and vLLM, SGLang and transformers load.

Layout written (verified against the ``compressed-tensors`` package 0.20.1: its ``pack_to_int32`` bytes,
its ``ModelCompressor`` decompression and transformers' compressed-tensors loader, in the tests):

* ``config.json``: the model's config with ``quantization_config`` = ``{"quant_method": "compressed-tensors",
  "format", "config_groups", "ignore", "kv_cache_scheme": null, "quantization_status": "compressed",
  "global_compression_ratio": null, "sparsity_config": {}, "transform_config": {}, "version"}``. One config
  group (``group_0``, ``group_1``, ...) per distinct scheme, in model order; its ``targets`` are the exact
  module names it covers, or ``["Linear"]`` when one scheme covers every quantized linear. ``ignore`` lists
  every linear kept in float by name (``lm_head`` included), as llm-compressor does. ``format`` is the
  groups' format, or ``"mixed-precision"`` when they differ (each group also names its own).
* weight-only linears (W4A16 / W8A16), ``"pack-quantized"``: ``weight_packed`` int32
  ``[out, ceil(in*b/32)]``, the unsigned codes ``q + 2**(b-1)`` as one little-endian bit stream per row
  (8 codes per word at 4 bits, 4 at 8 bits; the last word zero-padded), in the original input-feature
  order; ``weight_shape`` int64 ``[2]`` = ``(out, in)``; ``weight_scale`` ``[out, G]`` (``group``) or
  ``[out, 1]`` (``channel``); asymmetric grids add ``weight_zero_point`` int32 ``[ceil(out*b/32), G]``: the
  signed zero points offset by ``2**(b-1)``, i.e. our unsigned integer zero points, packed the same way
  along the OUTPUT dimension. ``w = (q - zero_point) * weight_scale`` with signed ``q`` is our
  ``(u - zero) * scale``: the bytes are those compressed-tensors' ``pack_to_int32`` writes.
* int8-activation linears (W8A8), ``"int-quantized"``: ``weight`` int8 ``[out, in]`` (signed ``q``),
  ``weight_scale`` ``[out, 1]``; ``input_activations`` ``{num_bits: 8, type: int, symmetric: true}`` with
  ``strategy: "token", dynamic: true`` (our ``act_mode="dynamic"``) or ``strategy: "tensor", dynamic:
  false`` and the ``input_scale`` tensor (float32 ``[1]``, our calibrated scale; ``act_mode="static"``).
  SmoothQuant needs nothing here: our quantizer already folded its per-channel scales into the preceding
  norms / linears, which are written as they are.
* everything else (embeddings, norms, a float head, biases) as it is in the model, or cast to ``dtype``;
  a tied output embedding is not written. Scales keep their own dtype (float16 or bfloat16) unless
  ``scale_dtype`` names one; float32 scales are written in float16 when every value is exact there.

Exact: symmetric grids (any width up to 8; 2 and 3 bits widened to 4 and 5/6 to 8 exactly), integer zero
points (and float minima that are whole steps of the scale, as every reader of GPTQ / AWQ /
compressed-tensors produces), per-channel act-order (the columns are put back in input order), act-order
permutations that keep each group's input features together, and group sizes that do not divide the input
features: the group strategy (and vLLM) need whole groups, so such a grid is written with the largest block
dividing both (at least 16; each scale repeated over its blocks, e.g. SmolLM2's 576 inputs at g128: blocks
of 64), or per channel when one group covers the row. Refused (`ExportError`, or converted with the change
measured when ``lossy=True``): float minima that are not whole steps (our default asymmetric grid; quantize
with integer zero points for an exact export), scales not exact in the scale dtype (float32 scales by
default), outlier weights kept in float, group sizes sharing no block of 16 or more with the input
features, and act-order permutations that mix the groups' features: those need a ``g_idx`` (``actorder:
"group"``), which compressed-tensors 0.20 removed. ``g_idx=True`` writes that older layout anyway
(``weight_g_idx`` int32 ``[in]``: the group of each input feature; codes in input order): vLLM releases
pinned to compressed-tensors < 0.20 and our reader load it, compressed-tensors >= 0.20 (and so transformers
with it) refuses it. Nothing is written when a module is refused.

Engines: vLLM's GPU kernels run W4A16 / W8A16 pack-quantized (Marlin: group sizes 32, 64, 128 or per
channel) and W8A8 int8; vLLM on CPU runs the 4-bit pack-quantized and the W8A8 int8 layouts, not W8A16.
vLLM fuses ``q/k/v_proj`` and ``gate/up_proj`` into one layer and needs one scheme for each fused set
(the report notes a model that mixes them). transformers' compressed-tensors integration (5.x with
compressed-tensors 0.20.1) de-quantizes symmetric and W8A8 folders on CPU to exactly our weights, and
emulates W8A8 activations with compressed-tensors' own fake quantization (dynamic per-token scales
``max|x| / 127.5``, where our kernels and vLLM's use ``max|x| / 127``; static ones as ours). It does not load
asymmetric pack-quantized folders, compressed-tensors' own included (it builds ``weight_zero_point``
unpacked); ``CompressedTensorsConfig(dequantize=True)`` loads a single-scheme one, de-quantized in the
scales' float16.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..quant.core.packing import pack
from ..quant.core.scheme import unpermute_columns
from .base import (
    ExportReport,
    copy_tokenizer,
    float_tensors,
    model_dtype,
    plain_config,
    quantized_linears,
    resolve_dtype,
    write_safetensors_folder,
)
from .grid import ExportError, Grid, GridTarget, module_grid, regroup, whole_group_size

logger = logging.get_logger(__name__)

#: what compressed-tensors holds for a linear: 4- and 8-bit integer grids with integer zero points, any
#: group size (checked per module: see `.grid.whole_group_size`), act-order, int8 activations
TARGET = GridTarget(
    name="compressed-tensors",
    bits=(4, 8),
    zero="integer",
    scale_dtype=torch.float16,
    group_sizes=None,
    act_order=True,
    int8_activations=True,
)
#: the compressed-tensors release whose layout this writer reproduces (written as ``version``)
LAYOUT_VERSION = "0.20.1"
ENGINES = ["vLLM", "SGLang", "transformers (compressed-tensors)"]
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
OPTIONS = ("scale_dtype", "g_idx", "progress")
#: smallest block a ragged group size is written with (its scales repeated); below it the module is refused
MIN_REPEATED_GROUP = 16
#: group sizes offered when a module's own cannot be written (lossy conversion)
_WHOLE_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
#: the linears vLLM fuses into one layer (its ``packed_modules_mapping`` for Llama-like families)
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def write_compressed_tensors(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    lossy: bool = False,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    report: ExportReport | None = None,
    scale_dtype: str | None = None,
    g_idx: bool = False,
    progress: bool = True,
    **options: Any,
) -> ExportReport:
    """Write ``model`` (holding hf-efficiency `QuantLinear` modules) as a compressed-tensors folder in
    ``out_dir`` (see the module docstring for the layout, what is exact and what is refused).

    Args:
        model: a transformers model whose quantized linears are our `QuantLinear`.
        out_dir: the folder to write (created; files of the same names are overwritten).
        lossy: convert modules compressed-tensors cannot hold exactly to the nearest grid it holds (change
            measured per module in the report) instead of raising `ExportError`.
        tokenizer: written beside the weights; default: the tokenizer files of the model's source folder.
        dtype: dtype of the tensors kept in float (``None``: their own).
        max_shard_size: safetensors shard size, as transformers shards.
        report: the `ExportReport` to fill (a new one when ``None``).
        scale_dtype: ``"float16"`` or ``"bfloat16"``: dtype of every written scale; ``None``: each module's
            own (float16 for float32 scales), always exact or refused.
        g_idx: write act-order permutations that mix groups with the ``weight_g_idx`` layout
            (``actorder: "group"``) that compressed-tensors 0.20 removed, instead of refusing them.
        progress: show a tqdm bar over the modules.

    Returns:
        The filled `ExportReport`. Nothing is written when a module is refused.
    """
    if options:
        raise ValueError(
            f"compressed-tensors export option(s) {', '.join(map(repr, sorted(options)))} not allowed; "
            f"allowed options: {', '.join(OPTIONS)}"
        )
    if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype!r} is not allowed; allowed values: None, {', '.join(SCALE_DTYPES)}")
    if not isinstance(g_idx, bool):
        raise ValueError(f"g_idx={g_idx!r} is not allowed; allowed values: True, False")
    if report is None:
        report = ExportReport(format="compressed-tensors", path=os.fspath(out_dir))
    float_dtype = resolve_dtype(dtype)
    linears = quantized_linears(model)

    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict[str, Any]] = {}  # module -> its scheme (targets filled in below)
    for name, module in tqdm(linears.items(), desc="compressed-tensors export", disable=not progress):
        grid = _module_grid(name, module, scale_dtype, g_idx, lossy)
        module_tensors, scheme, stored_as = _module_tensors(grid, module, scale_dtype, g_idx)
        tensors.update({f"{name}.{key}": t for key, t in module_tensors.items()})
        if grid.bias is not None:
            tensors[f"{name}.bias"] = grid.bias if float_dtype is None else grid.bias.to(float_dtype)
        schemes[name] = scheme
        report.record(grid, stored_as)

    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    qc = quantization_config(schemes, floats)
    config = plain_config(model, model_dtype(model, float_dtype))
    config["quantization_config"] = qc
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config.get("tie_word_embeddings") and any(m is out_emb for m in linears.values()):
        config["tie_word_embeddings"] = False  # a quantized head cannot be the (float) input embedding

    tensors.update(float_tensors(model, set(linears), float_dtype))
    generation_config = getattr(model, "generation_config", None)
    files = write_safetensors_folder(
        out_dir, tensors, config, max_shard_size=max_shard_size, generation_config=generation_config
    )
    files += copy_tokenizer(out_dir, getattr(model.config, "_name_or_path", None), tokenizer)

    report.files = sorted(set(files))
    report.float_modules = floats
    report.engines = list(ENGINES)
    if any(s["weights"].get("actorder") == "group" for s in schemes.values()):
        report.engines = ["vLLM (with compressed-tensors < 0.20)", "hf-efficiency (load_compressed)"]
        report.notes.append(
            "act-order modules are written with weight_g_idx (actorder 'group'), which compressed-tensors >= 0.20 "
            "(and transformers with it) refuses; vLLM releases pinned to an older compressed-tensors load it"
        )
    report.notes += _fused_notes(schemes, floats)
    if any(s["format"] == "pack-quantized" and not s["weights"]["symmetric"] for s in schemes.values()):
        report.notes.append(
            "transformers 5.x with compressed-tensors 0.20.1 does not load asymmetric pack-quantized folders on its "
            "default path (compressed-tensors' own included: it builds weight_zero_point unpacked); "
            "CompressedTensorsConfig(dequantize=True) loads a single-scheme folder with float16-rounded weights"
        )
    for note in report.notes:
        logger.warning(note)
    if float_dtype is not None:
        report.notes.append(f"float tensors written in {str(float_dtype).replace('torch.', '')}")
    logger.info(report.summary())
    return report


def quantization_config(schemes: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a compressed-tensors folder: one config group per distinct scheme
    (``schemes``: module name -> scheme without targets, in model order), float linears in ``ignore``."""
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for name, scheme in schemes.items():
        for known, targets in groups:
            if known == scheme:
                targets.append(name)
                break
        else:
            groups.append((scheme, [name]))
    config_groups = {}
    for i, (scheme, targets) in enumerate(groups):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else targets,
            "weights": dict(scheme["weights"]),
            "input_activations": scheme["input_activations"],
            "output_activations": None,
            "format": scheme["format"],
        }
    formats = {scheme["format"] for scheme, _ in groups}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing of unsigned codes ``[rows, n]``: ``ceil(n*bits/32)`` int32 words
    per row holding the little-endian bit stream (our packing without its padding to 32-code blocks)."""
    words = -(-codes.shape[-1] * bits // 32)
    return pack(codes, bits)[..., :words].contiguous()


def _module_grid(name: str, module, scale_dtype: str | None, g_idx: bool, lossy: bool) -> Grid:
    """``module`` on the compressed-tensors grid its layout allows (see `module_grid`), with the reasons
    this format adds (whole groups, act-order without g_idx) spelled out."""
    n, size = module.in_features, module.group_size
    target = replace(TARGET, scale_dtype=_scale_dtype(module, scale_dtype))
    explain: dict[str, str] = {}
    stored = whole_group_size(size, n)
    if stored == 0:
        target = replace(target, group_sizes=tuple(g for g in _WHOLE_GROUP_SIZES if n % g == 0) + (-1,))
        explain[f"group size {size} is not one {TARGET.name} stores"] = (
            f"group size {size} does not divide its {n} input features and shares no divisor of at least "
            f"{MIN_REPEATED_GROUP} with it (the compressed-tensors group strategy and vLLM need whole groups)"
        )
    perm = getattr(module, "weight_perm", None)
    if perm is not None and not g_idx and stored != 0 and not _groups_kept(perm.detach().cpu().long(), stored, n):
        target = replace(target, act_order=False)
        explain[f"{TARGET.name} cannot store an act-order column permutation"] = (
            "its act-order permutation mixes the input features of different groups, which needs a g_idx "
            "(actorder 'group'), removed in compressed-tensors 0.20 (g_idx=True writes that older layout)"
        )
    try:
        grid = module_grid(name, module, target, lossy=lossy)
    except ExportError as err:
        raise ExportError(_explained(str(err), explain)) from None
    grid.reasons = [_explained(r, explain) for r in grid.reasons]
    if grid.act_mode is not None and (grid.bits != 8 or grid.group_size is not None or not grid.symmetric):
        raise ExportError(  # QuantLinear allows no other W8A8 module; kept as a guard
            f"{name}: int8 activations need 8-bit symmetric per-channel weights for compressed-tensors' W8A8 "
            f"(int-quantized); it is {grid.bits}-bit, group size {grid.group_size}, symmetric={grid.symmetric}"
        )
    return grid


def _scale_dtype(module, scale_dtype: str | None) -> torch.dtype:
    """The dtype a module's scales are written in: ``scale_dtype``, else their own (float16 for float32)."""
    if scale_dtype is not None:
        return SCALE_DTYPES[scale_dtype]
    own = module.weight_scale.dtype
    return own if own in SCALE_DTYPES.values() else torch.float16


def _explained(text: str, explain: dict[str, str]) -> str:
    for generic, specific in explain.items():
        text = text.replace(generic, specific)
    return text


def _groups_kept(perm: torch.Tensor, size: int | None, n: int) -> bool:
    """Whether every stored group of ``size`` columns of an act-order permutation is one whole group of
    consecutive input features (then the columns go back to input order with the scales reordered)."""
    if size is None:
        return True
    blocks = (perm // size).reshape(-1, size)  # input group of each stored column, per stored group
    return bool((blocks == blocks[:, :1]).all())


def _module_tensors(
    grid: Grid, module, scale_dtype: str | None, g_idx: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The module's tensors (local names), its scheme (without targets) and how it is stored."""
    n, out, bits = grid.in_features, grid.out_features, grid.bits
    dtype = _scale_dtype(module, scale_dtype)
    codes = unpermute_columns(grid.codes, grid.perm)  # input-feature order
    size = whole_group_size(grid.group_size, n)
    note = ""
    if size is not None and size != grid.group_size:  # ragged groups: each scale repeated over its blocks
        note = f" (its g{grid.group_size} scales repeated over blocks of {size})"
        grid = regroup(grid, size)
    scale, zero = grid.scale, grid.zero
    legacy = False
    if grid.perm is not None and size is not None:
        stored_block = torch.arange(n, dtype=torch.int32) // size
        block_of = torch.empty_like(stored_block).index_copy_(0, grid.perm.long(), stored_block)  # per feature
        if _groups_kept(grid.perm.long(), size, n):
            order = block_of.long()[::size]  # stored block of each input block
            scale = scale.index_select(1, order)
            zero = None if zero is None else zero.index_select(1, order)
        elif g_idx:
            legacy = True
        else:  # _module_grid asked the grid to drop such permutations
            raise AssertionError(f"{grid.name}: act-order permutation left on the grid")
    symmetric = zero is None
    weights: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": size,
        "strategy": "channel" if size is None else "group",
        "dynamic": False,
    }
    tensors: dict[str, torch.Tensor] = {}
    half = 2 ** (bits - 1)
    if grid.act_mode is not None:
        fmt = "int-quantized"
        tensors["weight"] = (codes.to(torch.int16) - half).to(torch.int8).contiguous()
        if grid.act_mode == "dynamic":
            acts = {"strategy": "token", "dynamic": True}
            stored_as = "int8 channel sym, int8 activations dynamic per token"
        else:
            acts = {"strategy": "tensor", "dynamic": False}
            tensors["input_scale"] = grid.input_scale.detach().to(torch.float32).reshape(1).contiguous()
            stored_as = "int8 channel sym, int8 activations static per tensor"
        inputs = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, **acts}
    else:
        fmt = "pack-quantized"
        inputs = None
        tensors["weight_packed"] = pack_dense(codes, bits)
        tensors["weight_shape"] = torch.tensor([out, n], dtype=torch.int64)
        stored_as = f"int{bits} {'channel' if size is None else f'g{size}'} {'sym' if symmetric else 'asym'}"
        if legacy:
            weights["actorder"] = "group"
            tensors["weight_g_idx"] = block_of.contiguous()
            stored_as += " act-order (g_idx)"
    tensors["weight_scale"] = scale.to(dtype).contiguous()
    if not symmetric:
        tensors["weight_zero_point"] = pack_dense(zero.t().contiguous(), bits).t().contiguous()
    stored_as += note
    if grid.source_bits != bits:
        stored_as += f" (widened from int{grid.source_bits})"
    return tensors, {"weights": weights, "input_activations": inputs, "format": fmt}, stored_as


def _fused_notes(schemes: dict[str, dict[str, Any]], floats: list[str]) -> list[str]:
    """Notes for the linears vLLM fuses into one layer whose schemes differ (vLLM needs one per fused set)."""
    notes = []
    seen = set()
    for name in schemes:
        prefix, _, leaf = name.rpartition(".")
        for fused, parts in _FUSED.items():
            if leaf not in parts or (prefix, fused) in seen:
                continue
            seen.add((prefix, fused))
            members = [f"{prefix}.{p}" if prefix else p for p in parts]
            kinds = ["float" if m in floats else repr(schemes[m]) if m in schemes else None for m in members]
            present = [k for k in kinds if k is not None]
            if len(set(present)) > 1:
                notes.append(
                    f"{', '.join(m for m, k in zip(members, kinds) if k is not None)} are stored with different "
                    f"schemes; vLLM fuses them into one {fused} layer and needs one scheme for it, so vLLM will "
                    "not load this folder"
                )
    return notes


__all__ = [
    "LAYOUT_VERSION",
    "TARGET",
    "pack_dense",
    "quantization_config",
    "write_compressed_tensors",
]
