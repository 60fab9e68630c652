"""GGUF files -> our quantized modules, keeping the file's bits.

transformers' own GGUF support de-quantizes every tensor to float (a 4-bit 135M model becomes
538 MB in fp32). Here the architecture, config and tokenizer still come from transformers' GGUF
support (``AutoConfig`` / ``AutoTokenizer`` with ``gguf_file=``) and the tensor names from its
``get_gguf_hf_weights_map``, but each quantized linear weight is re-expressed in our packed format
(`.gguf_blocks`: exact for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), so the model
keeps the file's compression and runs on our kernels.

A tied output head (``tie_word_embeddings``: the file has no ``output.weight``, llama.cpp multiplies by
``token_embd``) is by default (``tied_head="quantized"``) loaded untied: the head becomes a `QuantLinear`
holding ``token_embd``'s own blocks (when its ggml type is one of the above) while the input embedding
stays the float de-quantization transformers gives it, so decoding multiplies by the file's 8.5 (Q8_0) or
fewer bits per weight instead of a float32 copy. ``tied_head="float"`` keeps the tied float head.

Row reorderings that transformers applies to some tensors (llama's rotary un-permutation of the
q/k projections) are applied to codes, scales and minima alike, which is exact because our groups
run along rows. A tensor processor that does anything else than permute rows makes that linear
load in float (with a warning).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..families import config_and_text_config, output_embedding_name
from ..quant.core.packing import pack
from ..quant.core.scheme import QuantizedWeight
from .common import FormatError, efficiency_config_for, format_of, load_model, meta_model, quantized_tensors
from .gguf_blocks import BLOCK_FORMATS, BlockFormat, decode_blocks

logger = logging.get_logger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
UNSUPPORTED_CHOICES = ("error", "float")
TIED_HEAD_CHOICES = ("quantized", "float")
SCALE_DTYPES = (None, "float16", "bfloat16", "float32")


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e


def split_gguf_path(path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str]:
    """``(folder, file name)`` of a GGUF file given as a path, or as a folder plus ``gguf_file``."""
    path = os.fspath(path)
    if gguf_file is not None:
        full = gguf_file if os.path.isabs(gguf_file) else os.path.join(path, gguf_file)
    else:
        full = path
    if not os.path.isfile(full):
        raise FileNotFoundError(f"GGUF file not found: {full}")
    return os.path.dirname(os.path.abspath(full)), os.path.basename(full)


#: ggml's GGML_MAX_DIMS: a tensor has at most this many dimensions
GGUF_MAX_DIMS = 4
#: items of one metadata array (gguf parses each item in Python, ~20 us apiece; the largest real arrays, the
#: tokenizer's tokens and merges, hold a few hundred thousand)
GGUF_MAX_ARRAY_ITEMS = 1 << 21


def open_reader(path: str):
    """A ``gguf.GGUFReader`` for ``path``, with llama.cpp's own checks of the header and tensor table.

    Any read past the end of the file (a truncated file, or a length or count in the header that claims
    more than the file holds, e.g. an array of 2**60 items) stops parsing at once; the tensor table must
    have at most 4 dimensions per tensor, rows of whole blocks, a known ggml type, and data that starts at
    the aligned end of the previous tensor and lies inside the file (a tensor extending past the end is
    reported as a truncated file naming it). Every failure is a `FormatError` naming ``path``.
    """
    _require_gguf()
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

    class CheckedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            end = int(offset) + np.dtype(dtype).itemsize * count
            if count < 0 or end > len(self.data):
                raise FormatError(
                    f"{path}: file is truncated or its header is corrupt: a field at byte {int(offset)} claims "
                    f"{count} item(s) of {np.dtype(dtype).name} (up to byte {end}) but the file has "
                    f"{len(self.data)} bytes"
                )
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) == int(GGUFValueType.ARRAY):
                items = int(self._get(int(orig_offs) + 4, np.uint64)[0])
                if items > GGUF_MAX_ARRAY_ITEMS:
                    raise FormatError(
                        f"{path}: a metadata array at byte {int(orig_offs)} claims {items} items; hf-efficiency reads "
                        f"at most {GGUF_MAX_ARRAY_ITEMS} (the header is corrupt)"
                    )
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            expected = 0
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8")
                where = f"{path}: tensor {name[:200]!r}"
                if len(dims) > GGUF_MAX_DIMS:
                    raise FormatError(f"{where} has {len(dims)} dimensions; GGUF allows at most {GGUF_MAX_DIMS}")
                try:
                    ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
                    block, type_size = GGML_QUANT_SIZES[ggml_type]
                except (ValueError, KeyError):
                    raise FormatError(f"{where} has unknown ggml type {int(raw_dtype[0])}") from None
                shape = [int(d) for d in dims]
                if any(d >= 2**63 for d in shape):
                    raise FormatError(f"{where} has dimensions {shape}, beyond GGUF's int64 range")
                if shape and shape[0] % block:
                    raise FormatError(
                        f"{where} ({ggml_type.name}) has rows of {shape[0]} weights, not whole blocks of {block}"
                    )
                count = 1
                for d in shape:
                    count *= d
                    if count > 8 * size:  # more elements than bits in the file: corrupt, whatever the type
                        break
                start = int(start_offs) + int(offset[0])
                end = start + count * type_size // block
                if int(offset[0]) != expected:
                    raise FormatError(
                        f"{where} starts at data offset {int(offset[0])}, expected {expected} (the aligned end of "
                        "the previous tensor); the tensor table is corrupt"
                    )
                if end > size:
                    raise FormatError(
                        f"{path}: file is truncated: tensor {name[:200]!r} ends at byte {end} but the file has "
                        f"{size} bytes; re-download it"
                    )
                nbytes = end - start
                expected = int(offset[0]) + nbytes + (-nbytes % self.alignment)
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except FormatError:
        raise
    except (ValueError, IndexError, OSError, KeyError, struct.error, OverflowError, TypeError) as e:
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:300]})") from e
    except RecursionError:
        raise FormatError(f"{path}: not a readable GGUF file (metadata arrays nested too deeply)") from None


def architecture_of(reader, path: str) -> str:
    """``general.architecture`` of an opened GGUF file (`FormatError` when it is absent or not a string)."""
    from gguf import GGUFValueType

    field = reader.fields.get("general.architecture")
    if field is None or field.types != [GGUFValueType.STRING] or len(field.data) != 1:
        raise FormatError(f"{path}: no string general.architecture in the GGUF metadata")
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: general.architecture is not UTF-8 ({e})") from None


def load_gguf_config(folder: str, name: str):
    """transformers' config for a GGUF file (architecture and hyper-parameters from its metadata); metadata
    transformers cannot turn into a config is a `FormatError` naming the file."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001 - transformers' GGUF metadata parsing raises anything on odd values
        raise FormatError(
            f"{os.path.join(folder, name)}: transformers cannot build a model config from the GGUF metadata "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
    return config


def _row_permutation(processor, gguf_name: str, rows: int, kwargs: dict) -> np.ndarray | None:
    """The row order transformers' tensor ``processor`` gives tensor ``gguf_name`` (``None``: unchanged),
    found by processing the row indices; raises ``ValueError`` when it is not a row permutation."""
    index = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    result = processor.process(weights=index, name=gguf_name, **kwargs)
    out = np.asarray(result.weights)
    if result.name != gguf_name or out.shape != (rows, 1) or not np.array_equal(np.sort(out[:, 0]), index[:, 0]):
        raise ValueError("not a row permutation")
    order = out[:, 0]
    return None if np.array_equal(order, index[:, 0]) else order


def _linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _tied_head(model: nn.Module, config) -> tuple[str, str] | None:
    """``(head module name, input embedding key)`` when ``config`` ties the model's output head (an
    ``nn.Linear``) to its input embeddings, else ``None``."""
    if not any(getattr(c, "tie_word_embeddings", False) for c in config_and_text_config(config)):
        return None
    head = output_embedding_name(model)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in is not None else None
    if head is None or emb is None or not isinstance(model.get_submodule(head), nn.Linear):
        return None
    embed = next((n for n, m in model.named_modules() if m is emb), None)
    return None if embed is None else (head, f"{embed}.weight")


def _untie_config(config) -> None:
    """``tie_word_embeddings=False`` on ``config`` and its text config (multimodal configs carry both)."""
    for c in config_and_text_config(config):
        c.tie_word_embeddings = False


def _round_scales(q: QuantizedWeight, dtype: torch.dtype) -> None:
    q.scale = q.scale.to(dtype)
    if q.minimum is not None:
        q.minimum = q.minimum.to(dtype)


def read_gguf(
    path: str | os.PathLike,
    config,
    *,
    model_class=None,
    scale_dtype: str | None = None,
    unsupported: str = "error",
    tied_head: str = "quantized",
    progress: bool = True,
    reader=None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Read a GGUF file for the model ``config`` describes.

    Returns ``(state_dict, formats, float_linears, report)``: our checkpoint keys for every quantized
    linear and float tensors for the rest, each quantized module's format, the linears kept in
    float, and a report (``types``: tensors per ggml type, ``rounded``: per module, the largest weight
    change when ``scale_dtype`` rounds K-quant scales, ``float_fallback``: linears stored in float,
    ``tied_head``: the output head re-expressed from ``token_embd``'s blocks, or ``None``).

    ``scale_dtype``: ``None`` keeps every scale exactly (float16 for the legacy types, float32 for the
    K-quants); ``"float16"``/``"bfloat16"`` round the K-quants' scales and minima (smaller, nearest).
    ``unsupported``: what to do with a linear weight in a ggml type we cannot express (IQ*, TQ*, ...):
    ``"error"`` (default) raises `FormatError` naming the tensor; ``"float"`` de-quantizes it to float.
    ``tied_head``: for a model whose head is tied to the input embeddings (``config.tie_word_embeddings``, or
    its text config's) and a file without an output tensor: ``"quantized"`` (default) also emits the head as
    a quantized module from ``token_embd``'s blocks (its state-dict keys and ``formats`` entry under the
    model's real output-embedding name, rows reordered as transformers reorders ``token_embd``) when that
    ggml type is one we express exactly, and then sets ``tie_word_embeddings=False`` on ``config`` (and its
    text config) so the model is built untied; the input embedding stays float either way. ``"float"``
    keeps the head tied to the float embedding.
    ``reader``: an already opened :func:`open_reader` of ``path`` (parsing the metadata takes seconds).
    """
    if tied_head not in TIED_HEAD_CHOICES:
        raise ValueError(f"tied_head={tied_head!r} is not allowed; allowed values: {', '.join(TIED_HEAD_CHOICES)}")
    if unsupported not in UNSUPPORTED_CHOICES:
        raise ValueError(
            f"unsupported={unsupported!r} is not allowed; allowed values: {', '.join(UNSUPPORTED_CHOICES)}"
        )
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype={scale_dtype!r} is not allowed; allowed values: None, float16, bfloat16, float32"
        )
    _require_gguf()
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    path = os.fspath(path)
    reader = open_reader(path) if reader is None else reader
    architecture = architecture_of(reader, path)
    model = meta_model(config, model_class, source=path, n_tensors=len(reader.tensors))
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(model, processor)
    linears = _linear_weights(model)
    process_kwargs = {"tensor_key_mapping": name_map, "parsed_parameters": {"tensors": {}, "config": config.to_dict()}}

    state_dict: dict[str, torch.Tensor] = {}
    formats: dict[str, dict[str, Any]] = {}
    float_linears: list[str] = []
    report: dict[str, Any] = {"types": {}, "rounded": {}, "float_fallback": [], "tied_head": None}
    rounding = None if scale_dtype is None else getattr(torch, scale_dtype)
    tied = _tied_head(model, config) if tied_head == "quantized" else None
    if tied is not None and any(name_map.get(t.name) == f"{tied[0]}.weight" for t in reader.tensors):
        tied = None  # the file has its own output tensor
    for t in tqdm(reader.tensors, desc="Reading GGUF tensors", disable=not progress):
        gguf_name = t.name
        type_name = GGMLQuantizationType(int(t.tensor_type)).name
        report["types"][type_name] = report["types"].get(type_name, 0) + 1
        hf_name = name_map.get(gguf_name)
        linear = linears.get(hf_name) if hf_name else None
        fmt = BLOCK_FORMATS.get(type_name)
        if tied is not None and hf_name == tied[1] and fmt is not None:
            head = _head_from_embedding(t, fmt, linears[f"{tied[0]}.weight"], processor, process_kwargs, path)
            if head is not None:
                q, symmetric = head
                if rounding is not None and q.scale.dtype != rounding:
                    report["rounded"][tied[0]] = _rounding_error(q, rounding)
                state_dict.update(quantized_tensors(tied[0], q))
                formats[tied[0]] = format_of(q, symmetric)
                report["tied_head"] = tied[0]
            # the input embedding itself loads in float below, as transformers loads it
        if linear is not None and fmt is not None:
            module = hf_name[: -len(".weight")]
            rows, n = linear.out_features, linear.in_features
            shape = [int(x) for x in reversed(list(t.shape))]
            if shape != [rows, n]:
                raise FormatError(f"{path}: tensor {gguf_name!r} ({hf_name}) has shape {shape}, expected {[rows, n]}")
            try:
                order = _row_permutation(processor, gguf_name, rows, process_kwargs)
            except ValueError:
                order = False
            if order is not False:
                q, symmetric = _quantized(t, fmt, n, path)
                if order is not None:
                    idx = torch.from_numpy(order)
                    q.packed, q.scale = q.packed[idx], q.scale[idx]
                    q.minimum = None if q.minimum is None else q.minimum[idx]
                if rounding is not None and q.scale.dtype != rounding:
                    report["rounded"][module] = _rounding_error(q, rounding)
                state_dict.update(quantized_tensors(module, q))
                formats[module] = format_of(q, symmetric)
                continue
            logger.warning(f"{path}: tensor {gguf_name!r} is not only row-permuted by transformers; it loads in float")
            report["float_fallback"].append(module)
        elif linear is not None and type_name not in FLOAT_TYPES:
            if unsupported == "error":
                raise FormatError(
                    f"{path}: tensor {gguf_name!r} ({hf_name}) uses ggml type {type_name}, which hf-efficiency cannot "
                    f"store exactly (supported: {', '.join(BLOCK_FORMATS)}); pass unsupported='float' to load it "
                    "de-quantized"
                )
            report["float_fallback"].append(hf_name[: -len(".weight")])
        # float path: everything transformers would load, exactly as it loads it
        try:
            weights = dequantize(t.data, GGMLQuantizationType(int(t.tensor_type)))
        except NotImplementedError as e:
            raise FormatError(f"{path}: tensor {gguf_name!r} uses ggml type {type_name}, which gguf cannot read: {e}")
        try:
            result = processor.process(weights=weights, name=gguf_name, **process_kwargs)
        except (ValueError, IndexError, KeyError, TypeError, RuntimeError) as e:  # e.g. a reshape of a wrong shape
            raise FormatError(
                f"{path}: tensor {gguf_name!r} of shape {[int(x) for x in t.shape]}: transformers' GGUF tensor "
                f"processing fails ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        if result.name not in name_map:
            continue
        name = name_map[result.name]
        state_dict[name] = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))
        if linear is not None:
            float_linears.append(name[: -len(".weight")])
    float_linears += [
        n[: -len(".weight")]
        for n in linears
        if n not in state_dict and n[: -len(".weight")] not in formats and n[: -len(".weight")] not in float_linears
    ]
    if report["tied_head"] is not None:
        _untie_config(config)  # the state dict now holds the head's own tensors
    return state_dict, formats, sorted(set(float_linears)), report


def _head_from_embedding(
    t, fmt: BlockFormat, head: nn.Linear, processor, process_kwargs: dict, path: str
) -> tuple[QuantizedWeight, bool] | None:
    """The tied output ``head`` as ``token_embd``'s own blocks (``t``), rows in the order transformers gives
    the embedding; ``None`` (with a warning) when the shapes differ or transformers does more to the
    embedding than permute its rows: the head then stays tied to the float embedding."""
    rows, n = head.out_features, head.in_features
    shape = [int(x) for x in reversed(list(t.shape))]
    reason = None
    if shape != [rows, n] or head.bias is not None:
        reason = f"its shape {shape} (head {[rows, n]}{', with a bias' if head.bias is not None else ''})"
    else:
        try:
            order = _row_permutation(processor, t.name, rows, process_kwargs)
        except (ValueError, IndexError, KeyError, TypeError, RuntimeError):
            reason = "transformers' processing of it is not a row permutation"
    if reason is not None:
        logger.warning(f"{path}: the tied output head stays float, tied to {t.name!r}: {reason}")
        return None
    q, symmetric = _quantized(t, fmt, n, path)
    if order is not None:
        idx = torch.from_numpy(order)
        q.packed, q.scale = q.packed[idx], q.scale[idx]
        q.minimum = None if q.minimum is None else q.minimum[idx]
    return q, symmetric


def _quantized(t, fmt: BlockFormat, n: int, path: str) -> tuple[QuantizedWeight, bool]:
    raw = np.asarray(t.data)
    rows = raw.shape[0] if raw.ndim == 2 else raw.size // (n // fmt.block_elems * fmt.block_bytes)
    try:
        codes, scale, minimum = decode_blocks(torch.from_numpy(np.array(raw, copy=True).reshape(rows, -1)), fmt, n)
    except ValueError as e:
        raise FormatError(f"{path}: tensor {t.name!r}: {e}") from e
    for what, value in (("scales", scale), ("minima", minimum)):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise FormatError(
                f"{path}: tensor {t.name!r} ({fmt.name}) holds non-finite block {what}; the file is corrupt"
            )
    dtype = fmt.exact_scale_dtype
    q = QuantizedWeight(
        packed=pack(codes, fmt.bits),
        scale=scale.to(dtype),
        minimum=None if minimum is None else minimum.to(dtype),
        bits=fmt.bits,
        group_size=fmt.group_size,
        in_features=n,
    )
    return q, fmt.symmetric


def _rounding_error(q: QuantizedWeight, dtype: torch.dtype) -> float:
    """Round ``q``'s scales/minima to ``dtype`` in place; return the largest weight change relative to
    the weights' largest magnitude."""
    exact = q.dequantize(torch.float32)
    _round_scales(q, dtype)
    return float((q.dequantize(torch.float32) - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def load_gguf(
    path: str | os.PathLike,
    gguf_file: str | None = None,
    *,
    model_class=None,
    scale_dtype: str | None = None,
    unsupported: str = "error",
    tied_head: str = "quantized",
    output_loading_info: bool = False,
    **from_pretrained_kwargs: Any,
):
    """Load a GGUF file into a transformers model whose linears are our `QuantLinear` modules holding the
    file's own codes (no float copy of the weights is ever built).

    ``path`` is the ``.gguf`` file, or a folder with ``gguf_file`` naming it. ``model_class`` defaults to
    ``AutoModelForCausalLM``. Other keyword arguments (``dtype``, default float32 for the float tensors;
    ``device_map``, ``attn_implementation`` ...) go to ``from_pretrained``. With ``output_loading_info=True``
    it returns ``(model, report)``: :func:`read_gguf`'s report (``"rounded"``: each module's largest relative
    weight change when ``scale_dtype`` rounds K-quant scales; ``"float_fallback"``: linears loaded in float;
    ``"tied_head"``: the head loaded quantized from ``token_embd``). ``tied_head``: ``"quantized"`` (default) loads
    a head tied to the input embeddings untied (``config.tie_word_embeddings=False``), as a `QuantLinear`
    holding ``token_embd``'s own blocks, the input embedding staying float; ``"float"`` keeps it tied to the
    float embedding (see :func:`read_gguf`). The tokenizer loads with transformers:
    ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``.
    """
    if tied_head not in TIED_HEAD_CHOICES:
        raise ValueError(f"tied_head={tied_head!r} is not allowed; allowed values: {', '.join(TIED_HEAD_CHOICES)}")
    folder, name = split_gguf_path(path, gguf_file)
    full = os.path.join(folder, name)
    reader = open_reader(full)  # bad files fail here with our message, not inside transformers' config parsing
    config = load_gguf_config(folder, name)
    state_dict, formats, float_linears, report = read_gguf(
        full,
        config,
        model_class=model_class,
        scale_dtype=scale_dtype,
        unsupported=unsupported,
        tied_head=tied_head,
        reader=reader,
    )
    del reader
    qcfg = efficiency_config_for(formats, float_linears)
    model = load_model(config, state_dict, qcfg, source=full, model_class=model_class, **from_pretrained_kwargs)
    model.config._name_or_path = folder
    if report["rounded"]:
        worst = max(report["rounded"].values())
        logger.warning(f"{name}: K-quant scales rounded to {scale_dtype}: largest relative weight change {worst:.2e}")
    return (model, report) if output_loading_info else model


def gguf_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """transformers' tokenizer for a GGUF file."""
    from transformers import AutoTokenizer

    folder, name = split_gguf_path(path, gguf_file)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"
