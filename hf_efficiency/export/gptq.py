"""GPTQ v1 folders (AutoGPTQ / GPTQModel ``checkpoint_format="gptq"``): what vLLM, TGI, GPTQModel and the
ExLlama / Marlin kernels load.

Layout, per quantized linear ``<name>`` (``in``/``out`` its features, ``G`` its groups)
---------------------------------------------------------------------------------------
* ``<name>.qweight`` int32 ``[in*bits/32, out]``: column ``o`` is a little-endian bit stream of the codes
  ``q[i, o]`` in ORIGINAL input order (code ``i`` at stream bits ``[bits*i, bits*(i+1))``; 3-bit codes
  straddle words), i.e. AutoGPTQ's ``QuantLinear.pack``: our packed rows transposed.
* ``<name>.qzeros`` int32 ``[G, out*bits/32]``: the zero points packed the same way along the output
  dimension, storing ``zero - 1`` (the v1 convention every v1 kernel undoes by adding 1).
* ``<name>.scales`` float16 ``[G, out]``; ``<name>.g_idx`` int32 ``[in]``: the group of each input feature
  (act-order modules: our ``weight_perm`` inverted, so the codes stay in input order);
  ``<name>.bias`` when the linear has one.
* ``w[o, i] = scales[g, o] * (q[i, o] - zero[g, o])``, ``g = g_idx[i]``.

``config.json``'s ``quantization_config``: ``quant_method "gptq"``, ``bits``, ``group_size`` (-1: per
channel), ``sym``, ``desc_act`` (true when a module has act-order), ``checkpoint_format``/``format``
``"gptq"``, ``pack_dtype "int32"``, ``lm_head`` (a quantized output embedding), ``damp_percent``,
``true_sequential``, ``static_groups``, ``meta``; the same dict is also written as
``quantize_config.json`` (AutoGPTQ / GPTQModel / TGI fall back to it). Modules whose width, group size or
symmetry differ from the most common one get GPTQModel ``dynamic`` overrides
(``{"+:<module regex>": {"bits", "group_size", "sym"}}``, read by vLLM, GPTQModel and our reader);
float linears inside the model get ``"-:<module regex>"`` entries.

Exactness and refusals
----------------------
Each module goes through :func:`.grid.module_grid` (target: 2/3/4/8 bits, integer zero points or
symmetric, float16 scales, any group size, act-order): symmetric modules, integer-zero modules and
float minima that are whole steps are written exactly, with float16-exact scales. Not exact (an
`ExportError` naming the module, or with ``lossy=True`` converted and measured): float minima that are not
whole steps, scales not exact in float16, outlier weights, int8 activations, widths GPTQ lacks (5/6
bits, or wider than the ``bits`` option) and -- GPTQ v1's own limit -- a zero point of 0, which v1 would
have to store as -1 (converted, with ``lossy``, by moving those groups to zero point 1 with the scale
kept or refitted, whichever changes the group less). Always refused (a shape the layout cannot hold):
``in_features`` or ``out_features`` not a multiple of 32.

Which engines run what
----------------------
vLLM CUDA: 2/3/4/8-bit (``gptq``; ``gptq_marlin`` for 4/8-bit symmetric); vLLM CPU: 4-bit symmetric only
(its Marlin-compatible CPU kernel), float16/bfloat16 only, in/out multiples of 32 and groups dividing
``in_features``; TGI (CUDA), GPTQModel, transformers only with ``gptqmodel`` installed; hf-efficiency
reads every folder written here (`hf_efficiency.formats.load_compressed`). Engines refuse float32, so the
config declares float16 for a float32 model (the float tensors are stored as they are and cast on load).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..formats.gptq import pack_rows
from ..quant.core.scheme import grouped, unpermute_columns
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
from .grid import ExportError, Grid, GridTarget, module_grid, regroup, whole_groups

logger = logging.get_logger(__name__)

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_TARGET = GridTarget(
    "GPTQ", bits=GPTQ_BITS, zero="integer", scale_dtype=torch.float16, group_sizes=None, act_order=True
)
_ALIGN = 32  # codes per block of `bits` int32 words


# ----------------------------------------------------------------------------- shared with the AWQ writer


def per_column(t: torch.Tensor, group_size: int | None, n: int) -> torch.Tensor:
    """``[out, G]`` per-group values -> ``[out, n]`` per column."""
    return t.repeat_interleave(n if group_size is None else group_size, dim=1)[:, :n]


def changed(grid: Grid, reference: torch.Tensor) -> Grid:
    """``grid`` with its change against ``reference`` (float32, input order) measured."""
    diff = grid.dequantize() - reference
    grid.change = float(diff.abs().max() / reference.abs().max().clamp_min(1e-30))
    grid.rms_change = float(diff.norm() / reference.norm().clamp_min(1e-30))
    return grid


def format_name(grid: Grid) -> str:
    """``"int4 g128 sym"``-style description of a grid."""
    group = "channel" if grid.group_size is None else f"g{grid.group_size}"
    return f"int{grid.bits} {group} {'sym' if is_symmetric(grid) else 'asym'}"


def is_symmetric(grid: Grid) -> bool:
    """True when every zero point is ``2**(bits-1)`` (an asymmetric module may be symmetric in fact)."""
    return grid.zero is None or bool((grid.zero == 2 ** (grid.bits - 1)).all())


# ----------------------------------------------------------------------------- GPTQ


def write_gptq(
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
    """Write ``model`` as a GPTQ v1 folder (see the module docstring); returns the `ExportReport`.

    Options: ``bits`` (``None``: each module at its own width, widened to the next GPTQ width; 2, 3, 4 or 8:
    every module at that width, e.g. ``bits=4`` for vLLM's CPU build; narrower modules are widened exactly,
    wider ones need ``lossy``), ``progress`` (a tqdm bar over the modules, default True).
    Every module is checked before any file is written: a refusal leaves ``out_dir`` untouched.
    """
    opts = export_options(options, {"bits": None, "progress": True}, "gptq")
    if opts["bits"] is not None and (isinstance(opts["bits"], bool) or opts["bits"] not in GPTQ_BITS):
        raise ValueError(
            f"bits={opts['bits']!r} is not allowed; allowed values: None, {', '.join(map(str, GPTQ_BITS))}"
        )
    report = report if report is not None else ExportReport(format="gptq", path=os.fspath(out_dir))
    float_dtype = resolve_dtype(dtype)
    modules = quantized_linears(model)
    target = GPTQ_TARGET if opts["bits"] is None else replace(GPTQ_TARGET, bits=(opts["bits"],))

    blocks = whole_groups(modules)  # vLLM needs groups dividing the row: SmolLM2's g128 is written as g64
    grids: dict[str, Grid] = {}
    for name, module in tqdm(modules.items(), desc="GPTQ export", disable=not opts["progress"]):
        check_gptq_shape(name, module)
        grid = v1_zero_points(module_grid(name, module, target, lossy=lossy), module, lossy)
        if blocks[name] != 0 and grid.group_size == module.group_size:
            grid = regroup(grid, blocks[name])  # each scale and zero repeated: exact
        grids[name] = grid

    tensors = float_tensors(model, set(modules), float_dtype)
    for name, grid in grids.items():
        tensors.update(gptq_tensors(grid, float_dtype))
        report.record(grid, f"{format_name(grid)}{' act-order' if has_act_order(grid) else ''} (GPTQ v1)")
    floats = float_linears(model)
    head = output_embedding_name(model)
    qc = gptq_quantization_config(grids, floats, head, model)
    declared = engine_dtype(model, float_dtype, report, "GPTQ")
    write_folder(
        model,
        out_dir,
        tensors,
        qc,
        dtype=declared,
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
        report=report,
        extra_files={"quantize_config.json": qc},
    )
    report.float_modules = floats
    cpu_ok = all(g.bits == 4 and is_symmetric(g) for g in grids.values())
    report.engines = [
        "vLLM (CUDA and CPU)" if cpu_ok else "vLLM (CUDA; its CPU build runs 4-bit symmetric GPTQ only)",
        "TGI (CUDA)",
        "GPTQModel",
        "transformers (with gptqmodel and optimum installed)",
        "hf-efficiency (load_compressed)",
    ]
    if not cpu_ok:
        report.notes.append(
            "vLLM's CPU build refuses this folder (it runs GPTQ 4-bit symmetric only): "
            + ", ".join(sorted({format_name(g) for g in grids.values() if not (g.bits == 4 and is_symmetric(g))}))
        )
    if qc.get("dynamic"):
        report.notes.append(
            "per-module formats are written as GPTQModel 'dynamic' overrides (vLLM, GPTQModel, hf-efficiency read "
            "them; AutoGPTQ does not); vLLM matches them against its own (possibly fused) module names"
        )
    if any(g.group_size is not None and g.in_features % g.group_size for g in grids.values()):
        report.notes.append(
            "some groups do not divide in_features and share no block of 16 or more with it (a partial last "
            "group): vLLM refuses such layers"
        )
    logger.info(report.summary())
    return report


def check_gptq_shape(name: str, module) -> None:
    """`ExportError` unless GPTQ's int32 packing holds the module's shape."""
    if module.in_features % _ALIGN or module.out_features % _ALIGN:
        raise ExportError(
            f"{name}: cannot be written to GPTQ: in_features ({module.in_features}) and out_features "
            f"({module.out_features}) must be multiples of {_ALIGN} (GPTQ packs blocks of 32 codes into int32 "
            "words); keep this module in float (quantization.modules_to_not_convert) to export the model"
        )


def has_act_order(grid: Grid) -> bool:
    """True when the module's ``g_idx`` is not the trivial ``i // group_size``."""
    if grid.perm is None or grid.group_size is None:
        return False
    trivial = torch.arange(grid.in_features, dtype=torch.int32) // grid.group_size
    return not torch.equal(grid.g_idx(), trivial)


def v1_zero_points(grid: Grid, module, lossy: bool) -> Grid:
    """``grid`` if GPTQ v1 can store its zero points (``zero - 1`` must be >= 0). A zero point of 0 raises an
    `ExportError`, or with ``lossy`` its groups move to zero point 1, keeping the scale or refitting it
    to the group's maximum (whichever changes the group less); the change is measured."""
    if grid.zero is None:
        return grid
    bad = grid.zero == 0
    if not bool(bad.any()):
        return grid
    reason = (
        f"{int(bad.sum())} of its {bad.numel()} groups have zero point 0, which GPTQ v1 cannot store "
        "(it stores zero - 1)"
    )
    if not lossy:
        raise ExportError(
            f"{grid.name}: cannot be written to GPTQ exactly: {reason}. Pass lossy=True (--lossy) to move those "
            "groups to zero point 1, with the change measured and reported"
        )
    reference = module.dequantize_weight(torch.float32).detach().cpu().float()
    w = reference if grid.perm is None else reference.index_select(1, grid.perm)  # stored column order
    n, gs, qmax = grid.in_features, grid.group_size, 2**grid.bits - 1
    wg, mask = grouped(w, gs)
    wmax = torch.where(mask, wg, torch.finfo(torch.float32).min).amax(-1).clamp(min=0.0)
    refit = (wmax / (qmax - 1)).to(torch.float16).float()
    refit = torch.where(refit > 2.0**-24, refit, grid.scale)
    one = torch.ones_like(grid.zero)

    def rounded(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = per_column(scale, gs, n)
        codes = torch.clamp(torch.round(w / s) + 1, 0, qmax)
        err, _ = grouped((codes - 1) * s - w, gs)
        return codes.to(torch.uint8), (err * err).sum(-1)

    kept_codes, kept_err = rounded(grid.scale)
    refit_codes, refit_err = rounded(refit)
    use_refit = refit_err < kept_err
    scale = torch.where(bad & use_refit, refit, grid.scale)
    new_codes = torch.where(per_column(use_refit, gs, n), refit_codes, kept_codes)
    codes = torch.where(per_column(bad, gs, n), new_codes, grid.codes)
    fixed = replace(
        grid,
        codes=codes,
        scale=scale,
        zero=torch.where(bad, one, grid.zero),
        reasons=[*grid.reasons, reason],
    )
    return changed(fixed, reference)


def gptq_tensors(grid: Grid, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one module (see the module docstring)."""
    codes = unpermute_columns(grid.codes, grid.perm)  # [out, in], input order
    zeros = grid.signed_zero() - 1  # v1: zero - 1, in [0, 2**bits - 2]
    if bool((zeros < 0).any()):  # pragma: no cover - v1_zero_points removed them
        raise ExportError(f"{grid.name}: a zero point of 0 reached the GPTQ v1 packer")
    out = {
        f"{grid.name}.qweight": pack_rows(codes, grid.bits).t().contiguous(),
        f"{grid.name}.qzeros": pack_rows(zeros.t().contiguous(), grid.bits),
        f"{grid.name}.scales": grid.scale.t().to(torch.float16).contiguous(),
        f"{grid.name}.g_idx": grid.g_idx().contiguous(),
    }
    if grid.bias is not None:
        bias = grid.bias.detach().cpu()
        out[f"{grid.name}.bias"] = (bias if float_dtype is None else bias.to(float_dtype)).contiguous()
    return out


def _module_format(grid: Grid) -> tuple[int, int, bool]:
    return grid.bits, -1 if grid.group_size is None else grid.group_size, is_symmetric(grid)


def _pattern(name: str) -> str:
    return re.escape(name) + "$"


def gptq_quantization_config(
    grids: dict[str, Grid], floats: list[str], head: str | None, model: nn.Module
) -> dict[str, Any]:
    """``quantization_config`` of the folder: the most common module format, GPTQModel ``dynamic``
    overrides for the others and for float linears."""
    from .. import __version__

    formats = {name: _module_format(g) for name, g in grids.items()}
    bits, group_size, sym = Counter(formats.values()).most_common(1)[0][0]
    dynamic: dict[str, dict[str, Any]] = {}
    for name, (b, g, s) in formats.items():
        if (b, g, s) != (bits, group_size, sym):
            dynamic[f"+:{_pattern(name)}"] = {"bits": b, "group_size": g, "sym": s}
    for name in floats:
        if name != head:
            dynamic[f"-:{_pattern(name)}"] = {}
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": any(has_act_order(g) for g in grids.values()),
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "lm_head": head is not None and head in grids,
        "damp_percent": _damp(model),
        "true_sequential": True,
        "static_groups": False,
        "meta": {"quantizer": [f"hf_efficiency:{__version__}"]},
    }
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def _damp(model: nn.Module) -> float:
    """The GPTQ dampening the model was quantized with (0.01 when it was not GPTQ): metadata only."""
    q = getattr(getattr(getattr(model, "config", None), "quantization_config", None), "quantization", None)
    damp = getattr(getattr(q, "options", None), "damp", None) if getattr(q, "method", None) == "gptq" else None
    return float(damp) if isinstance(damp, (int, float)) and 0 < damp < 1 else 0.01


__all__ = ["GPTQ_BITS", "GPTQ_TARGET", "gptq_quantization_config", "gptq_tensors", "write_gptq"]
