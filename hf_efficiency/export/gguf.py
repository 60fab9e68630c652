"""A model holding our quantized linears -> one GGUF file that llama.cpp (Ollama, LM Studio) runs.

``export_model(model, out, "gguf", ...)`` (or :func:`write_gguf`) writes ``out/model.gguf`` (option
``gguf_file``; an ``out`` ending in ``.gguf`` is the file itself), atomically (a temporary file renamed
into place).

**Quantized linears** go through :func:`.grid.module_grid` with the target ``GridTarget("gguf", bits=(4, 5, 8),
zero="float", scale_dtype=float16, block=32, act_order=False, symmetric_only_bits=(8,))`` and are written in the
ggml type that holds their codes exactly (:mod:`.gguf_blocks`):

============================================  =========  =================================================
our scheme                                    ggml type  how
============================================  =========  =================================================
asymmetric int4, float16 scale and minimum    Q4_1       ``d * q + m``, the group's ``d``/``m`` per block
symmetric int4                                Q4_0       ``d * (q - 8)``
asymmetric / symmetric 5-bit                  Q5_1/Q5_0
symmetric int8 (and 6-bit, widened)           Q8_0       ``d * (u - 128)``
3- and 2-bit codes                            Q4_0/Q4_1  widened exactly (same weights)
integer zero points (``w = (u - z) * s``)     Q4_1/Q5_1  ``m = -z * s`` when exact in float16
============================================  =========  =================================================

Groups are any multiple of 32 (a group of 64 writes its scale and minimum in two blocks) or per channel
when the row is a multiple of 32. A module the grid cannot hold exactly -- asymmetric 8-bit (no ggml type),
group size 16, act-order, outliers, scales not exact in float16, int8 activations -- raises `ExportError`
naming it, or with ``lossy=True`` is re-rounded onto the nearest grid (asymmetric 8-bit -> Q8_0, group 16
-> 32, ...) with the change measured in ``report.changes``. K-quant modules (loaded from a K-quant file:
groups of 16/32 with float32 two-level scales) are not re-factored into K-quant blocks: they go through
the same grid, so they are refused (float32 scales; groups of 16), or with ``lossy=True`` re-rounded
with the change measured: Q4_K -> Q4_1, Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K -> Q4_0, Q2_K -> Q4_1 (groups of 32).

**Float tensors**: the input embedding (``token_embd``) and a float untied output head follow
``embeddings``: ``"auto"`` (default) writes the smallest of Q8_0, F16, BF16, F32 that holds the tensor
exactly (proven by decoding), so a Q8_0 embedding de-quantized by the GGUF reader is written back byte
for byte; ``"q8_0"`` / ``"f16"`` / ``"f32"`` force the type, a lossy choice measured in
``report.changes``. 1-D tensors (norms, biases) are F32, as llama.cpp wants; other float matrices keep their
dtype (F32/F16/BF16) unless ``dtype`` asks for another (a lossy cast is noted with its measured change).

**Tied heads**: a head tied to the input embedding (``tie_word_embeddings``) is not written: llama.cpp uses
``token_embd`` when a file has no ``output.weight``. A quantized head whose de-quantized weight equals the
float input embedding exactly (what ``load_gguf`` gives a tied model: the head keeps ``token_embd``'s blocks,
the embedding their float de-quantization) is tied again: one ``token_embd.weight`` is written, in the
head's ggml type from its codes (``embeddings="auto"`` and a head the grid holds exactly; otherwise the
embedding per ``embeddings``), and no ``output.weight``. Any other quantized head is written as
``output.weight`` beside the embedding.

**Families**: Llama, Qwen2 and Gemma 3 (text) -- see :mod:`.gguf_metadata` for the keys and the tensor
layout changes (llama's rotary q/k row order, Gemma's ``1 + w`` norms, llama3 ``rope_freqs``).

**Tokenizer**: ``tokenizer=`` (a fast tokenizer) is converted (:func:`.gguf_metadata.write_tokenizer`).
Without it: a model loaded from a GGUF file (``load_gguf``, ``keep_compressed``; its ``name_or_path`` is the
file's folder) gets that file's own ``tokenizer.*`` and ``general.*`` fields copied unchanged; a model
loaded from a folder with tokenizer files gets ``AutoTokenizer.from_pretrained(folder)``; otherwise an
`ExportError` asks for ``tokenizer=``. ``tokenizer_pre`` overrides llama.cpp's pre-tokenizer name. When
several ``.gguf`` files sit in that folder, the first (by name) of the model's architecture and vocabulary
size is the source (quantizations of one model share their tokenizer).

A model loaded from a GGUF with ``keep_compressed`` writes back its own bytes: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
linears, a Q8_0 (or F16/F32) embedding, a tied head (the same single ``token_embd``) and F32 norms come out
byte-identical. ``max_shard_size`` is not used: a GGUF export is one file.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .base import ExportReport, ModuleChange, output_embedding_name, quantized_linears, resolve_dtype, tied_output_key
from .gguf_blocks import BLOCK, block_type, decode_raw, encode_blocks, exact_float_encoding, float_raw, q8_0_nearest
from .gguf_metadata import (
    copy_fields,
    family_of,
    gguf_tensor_name,
    llama_rope_rows,
    qk_heads,
    rope_freqs,
    tensor_name_map,
    write_architecture,
    write_tokenizer,
)
from .grid import ExportError, Grid, GridTarget, module_grid

logger = logging.get_logger(__name__)

GGUF_TARGET = GridTarget(
    "gguf",
    bits=(4, 5, 8),
    zero="float",
    scale_dtype=torch.float16,
    block=BLOCK,
    act_order=False,
    symmetric_only_bits=(8,),
)
EMBEDDING_CHOICES = ("auto", "q8_0", "f16", "f32")
_FLOAT_TYPE_OF = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FILE_TYPES = {
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def write_gguf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    lossy: bool = False,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    report: ExportReport | None = None,
    gguf_file: str = "model.gguf",
    embeddings: str = "auto",
    tokenizer_pre: str | None = None,
    progress: bool = True,
) -> ExportReport:
    """Write ``model`` as one GGUF file; see the module docstring. Returns (and fills) ``report``."""
    del max_shard_size  # one file
    if embeddings not in EMBEDDING_CHOICES:
        raise ValueError(f"embeddings={embeddings!r} is not allowed; allowed values: {', '.join(EMBEDDING_CHOICES)}")
    if not isinstance(gguf_file, str) or not gguf_file.endswith(".gguf") or os.sep in gguf_file:
        raise ValueError(f"gguf_file={gguf_file!r} is not allowed; allowed values: a file name ending in .gguf")
    float_dtype = resolve_dtype(dtype)
    path = os.fspath(out_dir)
    if not path.endswith(".gguf"):
        path = os.path.join(path, gguf_file)
    report = report if report is not None else ExportReport(format="gguf", path=os.fspath(out_dir))
    config = model.config
    family = family_of(config)
    qlinears = quantized_linears(model)

    from gguf import GGMLQuantizationType, LlamaFileType

    source, source_reader = (None, None) if tokenizer is not None else _source_gguf(model)
    if tokenizer is None and source is None:
        tokenizer = _folder_tokenizer(model)

    name_map = tensor_name_map(family, config.num_hidden_layers)
    embed_key = _input_embedding_key(model)
    tied = tied_output_key(model)
    head_name = output_embedding_name(model)
    retie = tied is None and _quantized_head_equals_embedding(model, qlinears, head_name, embed_key)
    head_grid = _exact_grid(head_name, qlinears[head_name]) if retie and embeddings == "auto" else None
    tensors: list[tuple[str, torch.Tensor, str]] = []  # (gguf name, raw bytes, ggml type)
    state = model.state_dict()
    bar = tqdm(total=len(state), desc="GGUF tensors", disable=not progress)
    for key, value in state.items():
        bar.update(1)
        owner, _, suffix = key.rpartition(".")
        if key == tied or (retie and owner == head_name):
            continue  # a tied head: token_embd holds it (llama.cpp ties a file without output.weight)
        if owner in qlinears and suffix not in ("weight", "bias"):
            continue  # scales, minima, ... are part of the weight
        gguf_name = gguf_tensor_name(name_map, key)
        if gguf_name is None:
            raise ExportError(f"{key}: llama.cpp's {family.arch} layout has no tensor for it")
        if owner in qlinears and suffix == "weight":
            grid = module_grid(owner, qlinears[owner], GGUF_TARGET, lossy=lossy)
            type_name, raw = _grid_blocks(grid, _rope_rows(config, family, gguf_name, grid.out_features))
            report.record(grid, type_name)
            tensors.append((gguf_name, raw, type_name))
            continue
        t = value.detach().cpu()
        rows = _rope_rows(config, family, gguf_name, int(t.shape[0]) if t.dim() else 0)
        if not t.is_floating_point():
            raise ExportError(f"{key}: a {t.dtype} tensor has no GGUF float type")
        if rows is not None:
            t = t.index_select(0, rows)
        if t.dim() == 1:
            if family.norm_shift and key.endswith("norm.weight"):
                t = 1.0 + t.float()  # Gemma's RMSNorm computes x * (1 + w) in float32
            tensors.append((gguf_name, float_raw("F32", t.float()), "F32"))
        elif key == embed_key and head_grid is not None:
            type_name, raw = _grid_blocks(head_grid, rows)
            report.record(head_grid, type_name)
            report.notes.append(
                f"{head_name}: equal to the input embedding; both written once as {gguf_name} ({type_name}, from the "
                "head's codes): llama.cpp ties a file without output.weight"
            )
            tensors.append((gguf_name, raw, type_name))
        elif key == embed_key or (owner == head_name and tied is None):
            type_name, raw = _embedding(key, t, embeddings, report)
            if key == embed_key and retie:
                report.notes.append(
                    f"{head_name}: equal to the input embedding; tied to {gguf_name} (written as {type_name}): "
                    "llama.cpp ties a file without output.weight"
                )
            tensors.append((gguf_name, raw, type_name))
            if key != embed_key:
                report.float_modules.append(owner)
        else:
            type_name, raw = _float_matrix(key, t, float_dtype, report)
            tensors.append((gguf_name, raw, type_name))
            if owner:
                report.float_modules.append(owner)
    bar.close()
    extra = rope_freqs(config) if family.arch == "llama" else None
    if extra is not None:
        tensors.append(("rope_freqs.weight", float_raw("F32", extra), "F32"))

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=folder)
    os.close(fd)
    writer = None
    try:
        writer = _writer_class()(tmp, family.arch)
        if source is not None:
            copied = copy_fields(writer, source_reader)
            report.notes.append(f"{len(copied)} tokenizer.* / general.* fields copied from {source}")
        else:
            writer.add_name(_model_name(model))
        vocab_size = _vocab_rows(model, config)
        report.notes += write_architecture(writer, config, family, vocab_size)
        if source is None:
            report.notes += write_tokenizer(writer, tokenizer, config, vocab_size, pre=tokenizer_pre)
        elif tokenizer_pre is not None:
            writer.add_tokenizer_pre(tokenizer_pre)
        common = Counter(report.quantized.values()).most_common(1)
        if common:
            writer.add_file_type(int(getattr(LlamaFileType, _FILE_TYPES[common[0][0]])))
        from gguf import GGML_QUANT_VERSION

        writer.add_quantization_version(GGML_QUANT_VERSION)
        for gguf_name, raw, type_name in tensors:
            writer.add_tensor(gguf_name, raw.numpy(), raw_dtype=GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    report.files.append(os.path.basename(path))
    if "llama.cpp" not in report.engines:
        report.engines.append("llama.cpp")
    counts = Counter(type_name for _, _, type_name in tensors)
    logger.info(f"GGUF export to {path}: {dict(counts)}")
    return report


# ------------------------------------------------------------------------------------------- helpers


def _writer_class():
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        """gguf's writer, also writing an empty array (which GGUF allows and gguf-py refuses): the merges of a
        byte-level vocabulary without any."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _quantized_head_equals_embedding(
    model: nn.Module, qlinears: dict, head_name: str | None, embed_key: str | None
) -> bool:
    """True when the output head is a `QuantLinear` without bias whose de-quantized weight equals the float input
    embedding exactly (a tied head loaded quantized by ``load_gguf``): the file can tie them again."""
    head = qlinears.get(head_name) if head_name else None
    if head is None or head.bias is not None or embed_key is None:
        return False
    emb = model.get_input_embeddings().weight.detach()
    if not emb.is_floating_point() or tuple(emb.shape) != (head.out_features, head.in_features):
        return False
    return torch.equal(head.dequantize_weight(torch.float32).cpu(), emb.float().cpu())


def _exact_grid(name: str, module) -> Grid | None:
    """``module`` on the GGUF grid when it fits exactly, else ``None``."""
    try:
        grid = module_grid(name, module, GGUF_TARGET, lossy=False)
    except ExportError:
        return None
    return grid if grid.exact else None


def _rope_rows(config, family, gguf_name: str, rows: int) -> torch.Tensor | None:
    """llama.cpp's row order for a llama q/k projection (weight or bias) of ``rows`` rows, else ``None``."""
    heads = qk_heads(config, gguf_name) if family.permute_qk else None
    return None if heads is None else llama_rope_rows(rows, heads)


def _grid_blocks(grid: Grid, rows: torch.Tensor | None) -> tuple[str, torch.Tensor]:
    """The ggml type and raw bytes of a grid (rows reordered by ``rows`` when given)."""
    if grid.perm is not None:  # pragma: no cover - the target refuses act-order
        raise ExportError(f"{grid.name}: GGUF cannot store an act-order column permutation")
    if grid.zero is not None:  # pragma: no cover - a float-minimum target never keeps integer zeros
        raise ExportError(f"{grid.name}: integer zero points must become float minima for GGUF")
    n = grid.in_features
    size = n if grid.group_size is None else grid.group_size
    block_group = torch.arange(n // BLOCK) * BLOCK // size
    scale = grid.scale.float()[:, block_group]
    minimum = None if grid.minimum is None else grid.minimum.float()[:, block_group]
    codes = grid.codes
    if rows is not None:
        codes, scale = codes.index_select(0, rows), scale.index_select(0, rows)
        minimum = None if minimum is None else minimum.index_select(0, rows)
    type_name = block_type(grid.bits, minimum is None)
    return type_name, encode_blocks(type_name, codes, scale, minimum)


def _change(exported: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = exported.float() - reference.float()
    ref = reference.float()
    return (
        float(diff.abs().max() / ref.abs().max().clamp_min(1e-30)),
        float(diff.norm() / ref.norm().clamp_min(1e-30)),
    )


def _embedding(key: str, t: torch.Tensor, choice: str, report: ExportReport) -> tuple[str, torch.Tensor]:
    """token_embd / a float output head per the ``embeddings`` choice."""
    module = key.rpartition(".")[0]
    n = t.shape[1]
    if choice == "auto":
        candidates = ("Q8_0", "F16", "BF16", "F32") if n % BLOCK == 0 else ("F16", "BF16", "F32")
        found = exact_float_encoding(t, candidates)
        assert found is not None  # F32 holds every float32, float16 and bfloat16 value
        report.notes.append(f"{module}: written as {found[0]} (exact)")
        return found
    wanted = {"q8_0": "Q8_0", "f16": "F16", "f32": "F32"}[choice]
    if wanted == "Q8_0" and n % BLOCK:
        raise ExportError(f"{module}: embeddings='q8_0' needs rows of a multiple of 32 weights; this one has {n}")
    found = exact_float_encoding(t, (wanted,))
    if found is not None:
        report.notes.append(f"{module}: written as {wanted} (exact)")
        return found
    raw = q8_0_nearest(t) if wanted == "Q8_0" else float_raw(wanted, t)
    exported = decode_raw(wanted, raw, n) if wanted == "Q8_0" else t.to(torch.float16).float()
    max_change, rms_change = _change(exported, t)
    report.changes[module] = ModuleChange([f"embeddings={choice!r} asked: rounded to {wanted}"], max_change, rms_change)
    return wanted, raw


def _float_matrix(
    key: str, t: torch.Tensor, dtype: torch.dtype | None, report: ExportReport
) -> tuple[str, torch.Tensor]:
    target = dtype or (t.dtype if t.dtype in _FLOAT_TYPE_OF else torch.float32)
    type_name = _FLOAT_TYPE_OF[target]
    cast = t.to(target)
    if not torch.equal(cast.float(), t.float()):
        max_change, rms_change = _change(cast, t)
        report.notes.append(f"{key}: cast to {type_name}: max change {max_change:.3e}, rms change {rms_change:.3e}")
    return type_name, float_raw(type_name, cast)


def _input_embedding_key(model: nn.Module) -> str | None:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in else None
    name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    return None if name is None else f"{name}.weight"


def _vocab_rows(model: nn.Module, config) -> int:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(config.vocab_size)


def _model_name(model: nn.Module) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or "")
    return os.path.basename(os.path.normpath(name)) if name else type(model).__name__


def _source_gguf(model: nn.Module) -> tuple[str | None, object | None]:
    """The GGUF file a model was loaded from by our GGUF reader (``name_or_path`` is its folder): the one
    ``.gguf`` there of the model's architecture and vocabulary size, with its opened reader; ``(None, None)``
    for other models."""
    folder = str(getattr(model.config, "_name_or_path", "") or "")
    if (
        not folder
        or not os.path.isdir(folder)
        or any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES)
    ):
        return None, None
    from ..formats.gguf import open_reader

    family = family_of(model.config)
    vocab = _vocab_rows(model, model.config)
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if not name.endswith(".gguf") or not os.path.isfile(full):
            continue
        try:
            reader = open_reader(full)
        except Exception:  # noqa: BLE001 - an unreadable neighbour is not the source
            continue
        arch = reader.fields.get("general.architecture")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if arch is not None and tokens is not None and arch.contents() == family.arch and len(tokens.data) == vocab:
            return full, reader
    return None, None


def _folder_tokenizer(model: nn.Module):
    folder = str(getattr(model.config, "_name_or_path", "") or "")
    if folder and os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    raise ExportError(
        "GGUF embeds the tokenizer: pass tokenizer=<the model's transformers tokenizer> (for a GGUF source, "
        "hf_efficiency.formats.gguf_tokenizer(path)); none was found beside the model "
        f"(name_or_path={folder!r})"
    )


def gguf_tensor_bytes(path: str | os.PathLike) -> dict[str, tuple[str, bytes]]:
    """``{name: (ggml type, raw bytes)}`` of every tensor of a GGUF file (for byte comparisons)."""
    from ..formats.gguf import open_reader

    reader = open_reader(os.fspath(path))
    return {t.name: (t.tensor_type.name, np.ascontiguousarray(t.data).tobytes()) for t in reader.tensors}


__all__ = ["EMBEDDING_CHOICES", "GGUF_TARGET", "gguf_tensor_bytes", "write_gguf"]
