"""What every exporter shares: the report, the model walk, the float tensors and the folder writing.

An exporter (one module per format) turns a model holding our `QuantLinear` modules into the files an
engine loads. It expresses each quantized linear on the format's grid with :func:`.grid.module_grid`
(exact, or converted with the change measured when the user allows it, or an `ExportError`), records
each module in an `ExportReport`, and writes the rest of the model (embeddings, norms, a float head)
unchanged in the model's own dtypes unless the user asks for another ``dtype``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..families import output_embedding_name
from ..quant.modules.experts import QuantExperts
from ..quant.modules.linear import QuantLinear
from .grid import ExportError, Grid

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ModuleChange:
    """A module the export could not hold exactly and converted (``lossy=True``)."""

    reasons: list[str]
    max_change: float  # largest |w_exported - w_ours| / max |w_ours|
    rms_change: float  # ||w_exported - w_ours|| / ||w_ours||


@dataclass
class ExportReport:
    """What an export wrote: returned by `export_model` and ``save_pretrained(..., export_format=...)``
    (also on ``model.export_report``), printed by ``hf-efficiency export``, quoted in the model card."""

    format: str
    path: str
    files: list[str] = field(default_factory=list)
    quantized: dict[str, str] = field(default_factory=dict)  # module -> how it is stored ("int4 g128 asym", "Q4_1")
    float_modules: list[str] = field(default_factory=list)  # linears written in float
    changes: dict[str, ModuleChange] = field(default_factory=dict)  # converted modules (empty: exact export)
    notes: list[str] = field(default_factory=list)  # anything else the user should know (dtype casts, ...)
    engines: list[str] = field(default_factory=list)  # engines known to load this layout

    @property
    def exact(self) -> bool:
        """True when every quantized weight was written exactly."""
        return not self.changes

    def record(self, grid: Grid, stored_as: str) -> None:
        """Note one module written from ``grid`` (its change, if converted)."""
        self.quantized[grid.name] = stored_as
        if not grid.exact:
            self.changes[grid.name] = ModuleChange(list(grid.reasons), grid.change, grid.rms_change)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exact"] = self.exact
        return out

    def summary(self) -> str:
        """A few human lines: what was written, and each converted module with its measured change."""
        lines = [
            f"{self.format} export to {self.path}: {len(self.quantized)} quantized linear(s)"
            + (f", {len(self.float_modules)} in float" if self.float_modules else "")
            + ("; every quantized weight written exactly" if self.exact else f"; {len(self.changes)} converted:")
        ]
        for name, c in self.changes.items():
            lines.append(
                f"  {name}: max change {c.max_change:.3e}, rms change {c.rms_change:.3e} ({'; '.join(c.reasons)})"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def refuse_quant_experts(model: nn.Module) -> None:
    """Raise `ExportError` naming the first `QuantExperts` module: no writer holds quantized fused
    mixture-of-experts tensors (the engines' MoE layouts per format are not implemented)."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantExperts)]
    if names:
        raise ExportError(
            f"{names[0]} holds quantized mixture-of-experts tensors (QuantExperts; {len(names)} such module(s)): "
            "exporting MoE experts to engine formats is not supported. Keep the model in the hf-efficiency format "
            "(save_pretrained), or keep the experts in float (add 'experts' to quantization.modules_to_not_convert) "
            "for an export"
        )


def refuse_online_rotations(model: nn.Module) -> None:
    """Raise `ExportError` naming the first `QuantLinear` that rotates its input at run time
    (``quantization.rotation="hadamard"``): no engine format runs that transform."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_rotation is not None]
    if names:
        raise ExportError(
            f"{names[0]} rotates its input by a Hadamard transform at run time (rotation='hadamard'; {len(names)} "
            "such module(s)), which no engine format runs. Quantize with rotation='hadamard-folded' (the rotations "
            "folded into the weights only) to export, or keep the model in the hf-efficiency format"
        )


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every `QuantLinear` of ``model`` by its module name (model order); an `ExportError` when there is none
    or when the model holds `QuantExperts` (see `refuse_quant_experts`)."""
    refuse_quant_experts(model)
    found = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not found:
        raise ExportError(
            "the model holds no hf-efficiency quantized linear (QuantLinear); quantize it first "
            "(from_pretrained(..., efficiency_config=...)) or load a compressed checkpoint with hf-efficiency"
        )
    return found


def float_linears(model: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` modules (kept in float) of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A float dtype from its name (``None`` keeps each tensor's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r} is not allowed; allowed values: None, {', '.join(FLOAT_DTYPES)}")


def float_tensors(
    model: nn.Module, skip_modules: set[str] | dict, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict without the tensors of ``skip_modules`` (the quantized ones) and without the
    tied copy of the input embeddings, floats cast to ``dtype`` when given (contiguous CPU tensors)."""
    tied = tied_output_key(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in skip_modules or key == tied:
            continue
        t = value.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous()
    return out


def tied_output_key(model: nn.Module) -> str | None:
    """The state-dict key of the output embedding when it is tied to the input embedding (not written)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if get_out else None
    inp = get_in() if get_in else None
    if out is None or inp is None or getattr(out, "weight", None) is not getattr(inp, "weight", None):
        return None
    name = next((n for n, m in model.named_modules() if m is out), None)
    return None if name is None else f"{name}.weight"


def model_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the exported config declares: ``dtype``, else that of the model's float parameters."""
    if dtype is not None:
        return dtype
    for p in model.parameters():
        if p.is_floating_point() and p.dtype in FLOAT_DTYPES.values() and p.dim() > 1:
            return p.dtype
    return torch.float32


def plain_config(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of ``model`` without our ``quantization_config``, declaring ``dtype``."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    name = str(dtype).replace("torch.", "")
    config["dtype"] = name
    config["torch_dtype"] = name
    return config


def write_safetensors_folder(
    out_dir: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    max_shard_size: int | str = "5GB",
    generation_config=None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` (sharded by ``max_shard_size`` as transformers shards, with an index) and
    ``config.json`` (and ``generation_config.json``) into ``out_dir``. Returns the file names written.

    The files are written into a staging folder and then published (`hf_efficiency.saving`): weight files of an
    earlier save in ``out_dir`` are removed, the index comes last, and every shard and the index carry one save
    id, so a folder never holds shards of two saves."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from ..saving import SAVE_ID_KEY, new_save_id, staged_save

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    save_id = new_save_id()
    files = []
    meta = {"format": "pt", **(metadata or {}), SAVE_ID_KEY: save_id}
    with staged_save(out_dir) as staging:
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: tensors[k] for k in keys}, os.path.join(staging, filename), metadata=meta)
            files.append(filename)
        if split.is_sharded:
            index = {
                "metadata": {
                    "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                    SAVE_ID_KEY: save_id,
                }
            }
            index["weight_map"] = dict(sorted(split.tensor_to_filename.items()))
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as fh:
                json.dump(index, fh, indent=2)
            files.append("model.safetensors.index.json")
        with open(os.path.join(staging, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
        files.append("config.json")
        if generation_config is not None:
            generation_config.save_pretrained(staging)
            files.append("generation_config.json")
    return files


def copy_tokenizer(out_dir: str | os.PathLike, source: str | os.PathLike | None = None, tokenizer=None) -> list[str]:
    """Put the tokenizer beside an exported folder: ``tokenizer.save_pretrained`` when given, else the
    tokenizer files of the local folder ``source`` (the model's ``name_or_path``). Returns the files written."""
    before = set(os.listdir(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    elif source is not None and os.path.isdir(source):
        for name in TOKENIZER_FILES:
            path = os.path.join(source, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out_dir, name))
    return sorted(set(os.listdir(out_dir)) - before)


def export_options(options: dict[str, Any], defaults: dict[str, Any], fmt: str) -> dict[str, Any]:
    """``defaults`` updated with the user's format ``options``; a `ValueError` names unknown keys and bad values."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {fmt} export option(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(defaults)}"
        )
    out = {**defaults, **options}
    if not isinstance(out["progress"], bool):
        raise ValueError(f"progress={out['progress']!r} is not allowed; allowed values: True, False")
    return out


def engine_dtype(model: nn.Module, float_dtype: torch.dtype | None, report: ExportReport, fmt: str) -> torch.dtype:
    """The dtype ``config.json`` declares: the float tensors' dtype, but float16 instead of float32 (GPTQ and
    AWQ engines refuse float32); the choice is noted in ``report``."""
    dtype = model_dtype(model, float_dtype)
    if dtype == torch.float32:
        report.notes.append(
            f"config.json declares dtype float16: {fmt} engines (vLLM, TGI) run float16/bfloat16 only; the float "
            "tensors (embeddings, norms, float linears) are stored in float32 and cast on load "
            "(pass dtype='float16' to store them in float16)"
        )
        return torch.float16
    if dtype == torch.bfloat16:
        report.notes.append(
            "the model is bfloat16: vLLM holds the float16 scales in the model dtype, so serving in bfloat16 rounds "
            "them; serve with dtype='float16' to compute with exactly the exported weights"
        )
    return dtype


def write_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    *,
    dtype: torch.dtype,
    tokenizer,
    max_shard_size: int | str,
    report: ExportReport,
    extra_files: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write ``tensors``, config.json (with ``quantization_config``), generation config, ``extra_files``
    (JSON) and the tokenizer; the file names go to ``report.files``."""
    config = plain_config(model, dtype)
    config["quantization_config"] = quantization_config
    files = write_safetensors_folder(
        out_dir,
        tensors,
        config,
        max_shard_size=max_shard_size,
        generation_config=getattr(model, "generation_config", None),
    )
    for name, data in (extra_files or {}).items():
        with open(os.path.join(out_dir, name), "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        files.append(name)
    files += copy_tokenizer(out_dir, getattr(model.config, "_name_or_path", None), tokenizer)
    report.files = files


__all__ = [
    "engine_dtype",
    "export_options",
    "output_embedding_name",
    "write_folder",
    "ExportError",
    "ExportReport",
    "ModuleChange",
    "copy_tokenizer",
    "float_linears",
    "float_tensors",
    "model_dtype",
    "plain_config",
    "quantized_linears",
    "resolve_dtype",
    "tied_output_key",
    "write_safetensors_folder",
]
