"""Writers of the formats engines serve: compressed-tensors and GPTQ / AWQ folders (vLLM, SGLang, TGI) and
GGUF files (llama.cpp, Ollama, LM Studio).

One entry point, :func:`export_model` (also ``model.save_pretrained(dir, export_format=...)``, the
``hf-efficiency export`` command and ``push_to_hub(..., export_format=...)``). Each quantized linear is
written on the format's grid exactly, or, with ``lossy=True``, converted to the nearest grid the format
holds with the change measured per module (`ExportReport.changes`); by default a module the format
cannot hold exactly raises `ExportError` naming it and the reason. Models holding quantized mixture-of-experts
tensors (`QuantExperts`) are refused with an `ExportError` naming the module.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn

from .base import ExportReport, ModuleChange, refuse_online_rotations, refuse_quant_experts
from .grid import ExportError, Grid, GridTarget, module_grid

#: format name -> (module of this package, writer function)
WRITERS: dict[str, tuple[str, str]] = {
    "compressed-tensors": ("compressed_tensors", "write_compressed_tensors"),
    "gptq": ("gptq", "write_gptq"),
    "awq": ("awq", "write_awq"),
    "gguf": ("gguf", "write_gguf"),
}
EXPORT_FORMATS = tuple(WRITERS)


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    export_format: str,
    *,
    lossy: bool = False,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    **options: Any,
) -> ExportReport:
    """Write ``model`` (holding hf-efficiency quantized linears) into ``out_dir`` in ``export_format``.

    ``lossy``: convert modules the format cannot hold exactly (change measured and reported) instead of
    raising `ExportError`. ``tokenizer``: written beside the weights (GGUF embeds it); default: the
    tokenizer files of the folder the model was loaded from. ``dtype``: dtype of the tensors kept in float
    (``None``: their own). Other keyword arguments are the format's own options (see each writer).
    Returns the `ExportReport` (also set as ``model.export_report``).
    """
    if export_format not in WRITERS:
        raise ValueError(f"export_format={export_format!r} is not allowed; allowed values: {', '.join(WRITERS)}")
    if not isinstance(lossy, bool):
        raise ValueError(f"lossy={lossy!r} is not allowed; allowed values: True, False")
    refuse_quant_experts(model)  # before anything is written
    refuse_online_rotations(model)
    module_name, function = WRITERS[export_format]
    writer = getattr(importlib.import_module(f"{__name__}.{module_name}"), function)
    report = ExportReport(format=export_format, path=os.fspath(out_dir))
    writer(
        model,
        out_dir,
        lossy=lossy,
        tokenizer=tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        report=report,
        **options,
    )
    try:
        model.export_report = report
    except AttributeError:  # pragma: no cover - exotic module types
        pass
    return report


__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportReport",
    "Grid",
    "GridTarget",
    "ModuleChange",
    "export_model",
    "module_grid",
]
