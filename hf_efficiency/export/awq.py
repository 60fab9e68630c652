"""AWQ GEMM folders (AutoAWQ ``WQLinear_GEMM``, ``version="gemm"``): what vLLM, TGI, AutoAWQ and
transformers (with gptqmodel) load.

Layout, per quantized linear ``<name>`` (``in``/``out`` its features, ``G = in / group_size``)
--------------------------------------------------------------------------------------------
* ``<name>.qweight`` int32 ``[in, out/8]`` and ``<name>.qzeros`` int32 ``[G, out/8]``: 4-bit codes and zero
  points packed along the OUTPUT dimension, nibble ``k`` (bits ``[4k, 4k+4)``) of word ``c`` holding output
  ``8c + AWQ_ORDER[k]``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (AutoAWQ's ``from_linear``; undone by
  ``awq.utils.packing_utils.dequantize_gemm``);
* ``<name>.scales`` float16 ``[G, out]``; ``<name>.bias`` when the linear has one;
* ``w[o, i] = (q[i, o] - zero[g, o]) * scales[g, o]``, ``g = i // group_size``.

``config.json``'s ``quantization_config``: ``quant_method "awq"``, ``version "gemm"``, ``zero_point true``,
``bits``/``w_bit`` 4, ``group_size``/``q_group_size`` (-1: per channel, AutoAWQ's ``in_features``),
``modules_to_not_convert`` (the float linears, or null) -- the keys of AutoAWQ's
``to_transformers_dict`` plus the AutoAWQ names vLLM also reads.

Exactness and refusals
----------------------
AWQ stores one format for the whole model: 4-bit, integer zero points, float16 scales, one group size,
no act-order. Each module goes through :func:`.grid.module_grid`: 2/3-bit modules are widened exactly,
symmetric modules are written with zero point 8 everywhere, integer zero points and float minima that are
whole steps exactly. Not exact (an `ExportError` naming the module, or with ``lossy=True`` converted and
measured): 8-bit modules, act-order modules (exact when per channel: one group per row), group sizes other than the model's most common one,
float minima that are not whole steps, scales not exact in float16, outliers, int8 activations. Always
refused (a shape or a module the layout cannot hold): ``out_features % 8 != 0``, a group size that does not
divide ``in_features``, a quantized output embedding (AWQ loaders never quantize ``lm_head``).

Which engines run what
----------------------
vLLM (CPU and CUDA; float16/bfloat16 only; the CPU build needs in/out multiples of 32 and an even group
size), TGI (CUDA), AutoAWQ, transformers only with ``gptqmodel`` installed, hf-efficiency
(`hf_efficiency.formats.load_compressed`). A float32 model's config declares float16 (see the GPTQ writer).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..quant.core.scheme import unpermute_columns
from .base import (
    ExportReport,
    engine_dtype,
    export_options,
    float_linears,
    float_tensors,
    output_embedding_name,
    quantized_linears,
    resolve_dtype,
    write_folder,
)
from .gptq import format_name
from .grid import ExportError, Grid, GridTarget, module_grid, regroup, whole_groups

logger = logging.get_logger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_TARGET = GridTarget("AWQ", bits=(4,), zero="integer", scale_dtype=torch.float16, group_sizes=None, act_order=False)


def write_awq(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    lossy: bool = False,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    report: ExportReport | None = None,
    **options: Any,
) -> ExportReport:
    """Write ``model`` as an AutoAWQ GEMM folder (see the module docstring); returns the `ExportReport`.

    Options: ``progress`` (a tqdm bar over the modules, default True). Every module is checked before any
    file is written: a refusal leaves ``out_dir`` untouched.
    """
    opts = export_options(options, {"progress": True}, "awq")
    report = report if report is not None else ExportReport(format="awq", path=os.fspath(out_dir))
    float_dtype = resolve_dtype(dtype)
    modules = quantized_linears(model)
    head = output_embedding_name(model)
    blocks = whole_groups(modules)  # groups must divide the row: SmolLM2's g128 is written as g64
    group = Counter(-1 if b is None else b for b in blocks.values()).most_common(1)[0][0]

    grids: dict[str, Grid] = {}
    for name, module in tqdm(modules.items(), desc="AWQ export", disable=not opts["progress"]):
        block = -1 if blocks[name] is None else blocks[name]
        check_awq_module(name, module, head, group, block, lossy)
        # one group per row: the column order does not matter, so an act-order permutation is undone exactly
        own = replace(AWQ_TARGET, act_order=module.group_size is None or group == -1)
        if block != group:  # only with lossy: converted to the model's group size
            own = replace(own, group_sizes=(group,))
        grid = module_grid(name, module, own, lossy=lossy)
        if grid.group_size == module.group_size:
            grid = regroup(grid, None if group == -1 else group)  # each scale and zero repeated: exact
        grids[name] = grid

    tensors = float_tensors(model, set(modules), float_dtype)
    for name, grid in grids.items():
        tensors.update(awq_tensors(grid, float_dtype))
        report.record(grid, f"{format_name(grid)} (AWQ GEMM)")
    floats = float_linears(model)
    qc = {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": 4,
        "w_bit": 4,
        "group_size": group,
        "q_group_size": group,
        "modules_to_not_convert": floats or None,
    }
    declared = engine_dtype(model, float_dtype, report, "AWQ")
    write_folder(
        model, out_dir, tensors, qc, dtype=declared, tokenizer=tokenizer, max_shard_size=max_shard_size, report=report
    )
    report.float_modules = floats
    report.engines = [
        "vLLM (CUDA and CPU)",
        "TGI (CUDA)",
        "AutoAWQ",
        "transformers (with gptqmodel installed)",
        "hf-efficiency (load_compressed)",
    ]
    shadowed = sorted({f for f in floats for q in grids if f in q})
    if shadowed:
        report.notes.append(
            "vLLM matches modules_to_not_convert as substrings: the float linear(s) "
            f"{', '.join(shadowed)} also match quantized module names, which vLLM would then load as float"
        )
    logger.info(report.summary())
    return report


def check_awq_module(name: str, module, head: str | None, group: int, block: int, lossy: bool) -> None:
    """`ExportError` for what the AWQ GEMM layout cannot hold at all, and (unless ``lossy``) for a group size
    other than the model's one (``block``: the module's own as it can be written, see `whole_groups`), with a
    message that says why."""
    if name == head:
        raise ExportError(
            f"{name}: cannot be written to AWQ: it is the output embedding, which AWQ loaders (AutoAWQ, "
            "transformers, vLLM) keep in float; quantize with lm_head in quantization.modules_to_not_convert"
        )
    if module.out_features % 8:
        raise ExportError(
            f"{name}: cannot be written to AWQ: out_features ({module.out_features}) must be a multiple of 8 "
            "(AWQ packs 8 output channels per int32 word); keep this module in float "
            "(quantization.modules_to_not_convert) to export the model"
        )
    own = -1 if module.group_size is None else module.group_size
    if block == 0 or group == 0:
        raise ExportError(
            f"{name}: cannot be written to AWQ: the model's group size {own} does not divide in_features "
            f"({module.in_features}) and shares no block of 16 or more with it; AWQ needs whole groups"
        )
    if block != group and not lossy:
        raise ExportError(
            f"{name}: cannot be written to AWQ exactly: its group size {own} differs from the model's group size "
            f"{group} (AWQ stores one group size per model). Pass lossy=True (--lossy) to convert it to the "
            "nearest grid the format holds, with the change measured and reported"
        )


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit ``values [rows, n]`` (``n % 8 == 0``) -> int32 ``[rows, n/8]``, nibble ``k`` of word ``c`` holding
    column ``8c + AWQ_ORDER[k]``."""
    rows, n = values.shape
    v = values.to(torch.int32).reshape(rows, n // 8, 8)
    words = torch.zeros(rows, n // 8, dtype=torch.int32)
    for k, column in enumerate(AWQ_ORDER):
        words |= v[..., column] << (4 * k)  # the top nibble wraps into the sign bit, as int32 words do
    return words


def awq_tensors(grid: Grid, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one module (see the module docstring)."""
    if grid.bits != 4 or grid.minimum is not None or (grid.perm is not None and grid.group_size is not None):
        raise ExportError(f"{grid.name}: not an AWQ grid (4-bit, integer zero, no act-order)")  # pragma: no cover
    codes = unpermute_columns(grid.codes, grid.perm)  # [out, in], input order
    out = {
        f"{grid.name}.qweight": pack_awq(codes.t()),
        f"{grid.name}.qzeros": pack_awq(grid.signed_zero().t()),
        f"{grid.name}.scales": grid.scale.t().to(torch.float16).contiguous(),
    }
    if grid.bias is not None:
        bias = grid.bias.detach().cpu()
        out[f"{grid.name}.bias"] = (bias if float_dtype is None else bias.to(float_dtype)).contiguous()
    return out


__all__ = ["AWQ_ORDER", "AWQ_TARGET", "awq_tensors", "pack_awq", "write_awq"]
