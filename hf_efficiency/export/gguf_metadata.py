"""What a GGUF file says besides its tensors: the architecture keys llama.cpp reads for each supported
family, the tensor names, and the tokenizer (pure functions of a transformers config and tokenizer).

Families (``config.model_type`` -> llama.cpp architecture):

* ``llama`` -> ``llama``: attn_q / attn_k rows in llama.cpp's rotary order (:func:`llama_rope_rows`),
  optional attention / MLP biases, ``llama3`` rope scaling as the ``rope_freqs`` tensor;
* ``qwen2`` -> ``qwen2``: q/k/v biases;
* ``gemma3_text`` (``Gemma3ForCausalLM``) -> ``gemma3``: every ``*norm.weight`` stored as ``1 + w`` (what
  Gemma3's RMSNorm multiplies by, in float32), the sliding window, the local rope base, pre/post norms,
  q/k norms and the final logit softcap.

A config feature llama.cpp would silently compute differently (an attention scale other than
``1/sqrt(head_dim)`` for Gemma 3, Qwen2's sliding window, an unknown rope scaling, attention softcapping
for Gemma 3) raises `ExportError`.

Tokenizers (a transformers *fast* tokenizer): byte-level BPE (GPT-2 / Llama-3 / SmolLM2 / Qwen2 style) is
written as ``tokenizer.ggml.model = "gpt2"`` with its merges and the llama.cpp pre-tokenizer name matching
its split regex (:func:`pre_tokenizer_name`); SentencePiece-style BPE (``▁`` for spaces, byte fallback:
Llama-2, Gemma) as ``"llama"`` with scores that order merges as the merge list does. A tokenizer whose
splitting llama.cpp has no name for is refused unless ``tokenizer_pre=`` names one. For a model loaded from
a GGUF file, :func:`copy_fields` carries the source file's own ``tokenizer.*`` and ``general.*`` fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .grid import ExportError


@dataclass(frozen=True)
class Family:
    """How one transformers model family is written for llama.cpp."""

    arch: str  # llama.cpp / gguf architecture name
    permute_qk: bool  # attn_q / attn_k rows in llama.cpp's rotary order
    norm_shift: float  # added to every ``*norm.weight`` (Gemma's ``1 + w``)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", True, 0.0),
    "qwen2": Family("qwen2", False, 0.0),
    "gemma3_text": Family("gemma3", False, 1.0),
}


def family_of(config) -> Family:
    """The `Family` of ``config``; an `ExportError` naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        hint = " (export the text model: Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise ExportError(
            f"GGUF export supports the model types {', '.join(FAMILIES)}; this model is {model_type!r}{hint}"
        )
    return FAMILIES[model_type]


def llama_rope_rows(rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp stores a llama q/k projection in: GGUF row ``i`` is transformers' row
    ``order[i]`` (each head's two rotary halves interleaved: the inverse of transformers' GGUF un-permute)."""
    if rows % (2 * n_head):
        raise ExportError(f"a q/k projection of {rows} rows does not split into {n_head} heads of rotary pairs")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def qk_heads(config, gguf_name: str) -> int | None:
    """Heads whose rows ``gguf_name`` holds when it is a llama q or k projection (weight or bias)."""
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def tensor_name_map(family: Family, num_layers: int):
    """gguf's transformers-name -> GGUF-name map for the family."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == family.arch)
    return get_tensor_name_map(arch, num_layers)


def gguf_tensor_name(name_map, key: str) -> str | None:
    """The GGUF name of the state-dict key ``key`` (``<module>.weight`` / ``.bias``), ``None`` if unmapped."""
    module, _, suffix = key.rpartition(".")
    mapped = name_map.get_name(module)
    return None if mapped is None else f"{mapped}.{suffix}"


# ----------------------------------------------------------------------------------------- architecture


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, layer_type: str | None = None) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params = {**params, "rope_theta": config.rope_theta}
    return dict(params)


def rope_freqs(config) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` tensor (a divisor per rotary frequency) for ``llama3`` rope scaling: the
    ratio of transformers' plain and scaled inverse frequencies; ``None`` for other rope types."""
    if _rope(config).get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    theta = _rope(config)["rope_theta"]
    dim = int(_head_dim(config) * _rope(config).get("partial_rotary_factor", 1.0))
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float()).float()


def _add_rope_scaling(writer, params: dict[str, Any], family: Family) -> None:
    from gguf import RopeScalingType

    kind = params.get("rope_type", "default")
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        if params.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    elif kind == "llama3" and family.arch == "llama":
        return  # the rope_freqs tensor carries it
    else:
        raise ExportError(f"rope scaling {kind!r} is not one the GGUF export writes for {family.arch}")


def write_architecture(writer, config, family: Family, vocab_size: int) -> list[str]:
    """Add the architecture keys llama.cpp reads for ``family``; returns notes for the report."""
    notes: list[str] = []
    head_dim = _head_dim(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(vocab_size))
    if family.arch == "gemma3":
        _gemma3(writer, config, head_dim, notes)
        return notes
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    _add_rope_scaling(writer, rope, family)
    if family.arch == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ExportError("Qwen2 with use_sliding_window=True: llama.cpp's qwen2 runs full attention on every layer")
    return notes


def _gemma3(writer, config, head_dim: int, notes: list[str]) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    n_layer = config.num_hidden_layers
    # llama.cpp's gemma3 scales attention by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B
    expected = config.hidden_size / config.num_attention_heads if n_layer == 62 else head_dim
    if float(scalar) != float(expected):
        raise ExportError(
            f"Gemma 3 with query_pre_attn_scalar={scalar}: llama.cpp scales attention by 1/sqrt({expected:g}) "
            "for this model, so it would compute a different model"
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise ExportError("Gemma 3 with attn_logit_softcapping: llama.cpp's gemma3 does not apply it")
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    full, local = _rope(config, "full_attention"), _rope(config, "sliding_attention")
    writer.add_rope_freq_base(float(full["rope_theta"]))
    _add_rope_scaling(writer, full, FAMILIES["gemma3_text"])
    if local.get("rope_type", "default") != "default":
        raise ExportError("Gemma 3 with scaled rope on its sliding layers: llama.cpp scales the global layers only")
    layer_types = list(getattr(config, "layer_types", None) or [])
    sliding = [t == "sliding_attention" for t in layer_types]
    if any(sliding):
        if float(local.get("rope_theta", 10000.0)) != 10000.0:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))
        writer.add_sliding_window(int(config.sliding_window))
        if sliding != [i % 6 < 5 for i in range(n_layer)]:
            writer.add_sliding_window_pattern(sliding)
            notes.append("layer_types differ from Gemma 3's 5 sliding : 1 global pattern; written per layer")
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


# ------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_regexes() -> dict[str, str]:
    """llama.cpp pre-tokenizer name by the split regex transformers' GGUF reader gives it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    preferred = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35")
    out: dict[str, str] = {}
    for name in preferred:
        if name in GGUF_PRE_TOKENIZER_SPLITS:
            out.setdefault(GGUF_PRE_TOKENIZER_SPLITS[name], name)
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        out.setdefault(regex, name)
    return out


def _flat(component: dict | None) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in component else "normalizers"
        return [c for sub in component.get(key, []) for c in _flat(sub)]
    return [component]


def pre_tokenizer_name(backend: dict) -> str | None:
    """The llama.cpp ``tokenizer.ggml.pre`` name of a byte-level BPE tokenizer's splitting (from its
    ``tokenizer.json``), ``None`` when llama.cpp has no equivalent."""
    parts = _flat(backend.get("pre_tokenizer"))
    if backend.get("normalizer"):
        return None
    kinds = [p.get("type") for p in parts]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        split = parts[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            return _pre_tokenizer_regexes().get(pattern)
    return None


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    return json.loads(backend.to_str())


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _special_id(tokenizer, config, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        value = getattr(config, f"{name}_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) <= len(plain):
        return False
    return (with_special[0] if first else with_special[-1]) == token_id


def write_tokenizer(writer, tokenizer, config, vocab_size: int, *, pre: str | None = None) -> list[str]:
    """Add the ``tokenizer.*`` keys for ``tokenizer`` (``vocab_size`` tokens, padded with unused ones when
    the model's embedding is larger); returns notes for the report."""
    from gguf import GGUFValueType, Keys, TokenType

    notes: list[str] = []
    backend = _backend(tokenizer)
    model = backend.get("model") or {}
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has token ids up to {max(vocab.values())} but the model's vocabulary has {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = int(TokenType.NORMAL)
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    for token, info in added.items():
        if token in vocab:
            types[vocab[token]] = int(TokenType.CONTROL if info.special else TokenType.USER_DEFINED)
    merges = _merges(model)
    normalizers = [n.get("type") for n in _flat(backend.get("normalizer"))]
    pre_parts = [p.get("type") for p in _flat(backend.get("pre_tokenizer"))]
    spm = (
        model.get("type") == "BPE"
        and "ByteLevel" not in pre_parts
        and (bool(model.get("byte_fallback")) or "Replace" in normalizers or "Metaspace" in pre_parts)
    )
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export writes BPE tokenizers; this one is {model.get('type')!r}")
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or "default")
        scores = _spm_scores(tokens, merges)
        unk = model.get("unk_token")
        for i, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">") and types[i] == TokenType.NORMAL:
                types[i] = int(TokenType.BYTE)
            elif token == unk:
                types[i] = int(TokenType.UNKNOWN)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        prepend = any(n.get("type") == "Prepend" for n in _flat(backend.get("normalizer"))) or any(
            p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
            for p in _flat(backend.get("pre_tokenizer"))
        )
        writer.add_add_space_prefix(bool(prepend))
    else:
        # without merges every byte stays its own token, however the text is split
        name = pre or pre_tokenizer_name(backend) or (None if merges else "default")
        if name is None:
            raise ExportError(
                "llama.cpp has no pre-tokenizer matching this tokenizer's splitting "
                f"({json.dumps(backend.get('pre_tokenizer'))[:200]}); pass tokenizer_pre='<llama.cpp name>' to choose one"
            )
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(name)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp needs the key even when it is empty (gguf's add_array skips empty lists)
        writer.add_key_value(Keys.Tokenizer.MERGES, merges, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        writer.add_add_space_prefix(False)
    ids = {name: _special_id(tokenizer, config, name) for name in ("bos", "eos", "unk", "pad")}
    if ids["bos"] is not None:
        writer.add_bos_token_id(ids["bos"])
    if ids["eos"] is not None:
        writer.add_eos_token_id(ids["eos"])
    if ids["unk"] is not None:
        writer.add_unk_token_id(ids["unk"])
    if ids["pad"] is not None:
        writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(_adds(tokenizer, ids["bos"], first=True))
    writer.add_add_eos_token(_adds(tokenizer, ids["eos"], first=False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    if len(vocab) < vocab_size:
        notes.append(
            f"tokenizer has {len(vocab)} tokens; {vocab_size - len(vocab)} unused [PAD] tokens fill the vocabulary"
        )
    return notes


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token scores highest: a
    merged token scores minus its first merge's rank, so merges apply in the merge list's order."""
    index = {t: i for i, t in enumerate(tokens)}
    scores = [-float(len(merges) + i) for i in range(len(tokens))]
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        i = index.get(left + right)
        if i is not None and scores[i] < -float(rank):
            scores[i] = -float(rank)
    return scores


# --------------------------------------------------------------------------------- source GGUF fields

#: keys of a source file that describe that file, not the model, and are not copied
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def copy_fields(writer, reader, prefixes: tuple[str, ...] = ("general.", "tokenizer.")) -> list[str]:
    """Copy ``reader``'s fields under ``prefixes`` (values and types unchanged) into ``writer``; returns the keys."""
    from gguf import GGUFValueType

    copied = []
    for key, field in reader.fields.items():
        if not key.startswith(prefixes) or key in _NOT_COPIED or not field.types:
            continue
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main)
        copied.append(key)
    return copied


__all__ = [
    "FAMILIES",
    "Family",
    "copy_fields",
    "family_of",
    "gguf_tensor_name",
    "llama_rope_rows",
    "pre_tokenizer_name",
    "qk_heads",
    "rope_freqs",
    "tensor_name_map",
    "write_architecture",
    "write_tokenizer",
]
