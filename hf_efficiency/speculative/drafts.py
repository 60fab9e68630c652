"""Drafts for speculative decoding: each proposes up to ``k`` tokens per row after the current slots.

* `ModelDrafter`: any causal LM sharing the target's tokenizer, with its own KV cache. It runs a
  separate smaller model, or a view/copy of the target built here:
  `quantized_copy` (weight-quantized with a foundation scheme, embeddings shared), `half_copy`
  (bfloat16/float16) and `early_exit_model` (the target's first K layers, sharing their weights).
* `NgramDrafter`: prompt lookup, no model.

`build_drafter` turns a `SpeculativeSpec.draft` name (or a model, or a path) into one of these.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn

from ..config import DRAFT_DTYPES, DRAFT_SCHEME_PATTERN, EARLY_EXIT_PATTERN, QuantizationSpec, SpeculativeSpec
from .slots import Slots, crop_cache, forward_slots
from .warp import RowWarp as Warp


@dataclass
class Proposal:
    """Drafted ``tokens [B, k]``, how many of them each row offers (``lengths [B]``), and for sampling
    the distributions they were drawn from (``probs [B, k, V]``; one-hot for a deterministic draft)."""

    tokens: Tensor
    lengths: Tensor
    probs: Tensor | None = None


class Drafter:
    """Base class: ``propose`` after the slots, ``rollback`` to a slot count, ``reset`` per generation."""

    #: a model whose forward passes cost time (None for free drafts such as n-gram lookup)
    model: nn.Module | None = None

    def reset(self) -> None:
        pass

    def propose(
        self, slots: Slots, k: int, *, warp: Warp | None, do_sample: bool, generator: torch.Generator | None
    ) -> Proposal:
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        pass


def _fit_vocab(logits: Tensor, vocab: int) -> Tensor:
    """Draft logits over the target's ``vocab`` ids: extra draft ids are cut, missing ones get -inf."""
    v = logits.shape[-1]
    if v > vocab:
        return logits[..., :vocab]
    if v < vocab:
        pad = logits.new_full((*logits.shape[:-1], vocab - v), float("-inf"))
        return torch.cat([logits, pad], dim=-1)
    return logits


class ModelDrafter(Drafter):
    """A causal LM drafting autoregressively with its own KV cache over the shared slots."""

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.cache = None

    def reset(self) -> None:
        from transformers.cache_utils import DynamicCache

        from .slots import rollback_cache

        self.cache = rollback_cache(DynamicCache(config=getattr(self.model, "config", None)))

    def propose(
        self, slots: Slots, k: int, *, warp: Warp | None, do_sample: bool, generator: torch.Generator | None
    ) -> Proposal:
        if self.cache is None:
            self.reset()
        mask = slots.mask
        past = self.cache.get_seq_length()
        logits = forward_slots(self.model, self.cache, slots.ids[:, past:], mask, keep=1)[:, -1]
        rows = slots.rows() if warp is not None and warp.per_row else None
        tokens, probs = [], []
        for i in range(k):
            scores = _fit_vocab(logits, self.vocab_size)
            if warp is not None:
                scores = warp(scores, lambda: [torch.cat([p, *(t[b] for t in tokens)]) for b, p in enumerate(rows)])
            if do_sample:
                q = torch.softmax(scores, dim=-1)
                tok = torch.multinomial(q, 1, generator=generator)
                probs.append(q)
            else:
                tok = scores.argmax(-1, keepdim=True)
            tokens.append(tok)
            if i + 1 < k:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits = forward_slots(self.model, self.cache, tok, mask, keep=1)[:, -1]
        b = slots.ids.shape[0]
        return Proposal(
            torch.cat(tokens, dim=1),
            torch.full((b,), k, dtype=torch.long, device=slots.ids.device),
            torch.stack(probs, dim=1) if do_sample else None,
        )

    def rollback(self, length: int) -> None:
        if self.cache is not None:
            crop_cache(self.cache, length)


class NgramDrafter(Drafter):
    """Prompt lookup: find an earlier occurrence of the row's last ``n`` tokens (``n`` from ``max_ngram``
    down to 1) and propose the tokens that followed it. Rows without a match offer none."""

    def __init__(self, vocab_size: int, max_ngram: int = 3) -> None:
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram

    def continuation(self, row: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens following an earlier occurrence of ``row``'s last n-gram: the latest
        occurrence followed by ``k`` tokens, else the one followed by the most (inside a repeating loop
        the latest occurrence overlaps the end and is followed by fewer tokens than an earlier one)."""
        size = len(row)
        for n in range(min(self.max_ngram, size - 1), 0, -1):
            tail = row[-n:]
            first, best = tail[0], []
            for start in range(size - n - 1, -1, -1):  # latest first; a match must have a token after it
                if row[start] == first and row[start : start + n] == tail:
                    cont = row[start + n : start + n + k]
                    if len(cont) == k:
                        return cont
                    if len(cont) > len(best):
                        best = cont
            if best:
                return best
        return []

    def propose(
        self, slots: Slots, k: int, *, warp: Warp | None, do_sample: bool, generator: torch.Generator | None
    ) -> Proposal:
        conts = [self.continuation(r, k) for r in slots.host]
        b, device = len(conts), slots.ids.device
        padded = [c + [0] * (k - len(c)) for c in conts]
        tokens = torch.tensor(padded, dtype=torch.long, device=device).view(b, k)
        lengths = torch.tensor([len(c) for c in conts], dtype=torch.long, device=device)
        probs = None
        if do_sample:  # a deterministic proposal is a one-hot draft distribution
            probs = torch.zeros(b, k, self.vocab_size, device=device)
            probs.scatter_(2, tokens[..., None], 1.0)
        return Proposal(tokens, lengths, probs)


# --- drafts built from the target -------------------------------------------------------------


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s children, parameters and buffers."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def early_exit_model(target: nn.Module, num_layers: int) -> nn.Module:
    """A view of ``target`` running only its first ``num_layers`` decoder layers, then its final norm
    and head. It shares every tensor with the target (no copy)."""
    from ..families import find_decoder_layers

    # model.layers, OPT's model.decoder.layers, GPT-2's transformer.h
    list_path, layers = find_decoder_layers(target)
    *path, name = list_path.split(".")  # path: the modules from the target down to the list's owner
    if not 1 <= num_layers < len(layers):
        raise ValueError(f"early-exit:{num_layers} needs 1 <= K < {len(layers)} (the target's decoder layers)")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    chain = [target] + [target.get_submodule(".".join(path[: i + 1])) for i in range(len(path))]
    views = [_shallow(m) for m in chain]
    views[-1]._modules[name] = nn.ModuleList(list(layers)[:num_layers])
    for view, child_name, child in zip(views, path, views[1:]):
        view._modules[child_name] = child
    for view in views:
        if hasattr(view, "config"):
            view.config = config
    return views[0].eval()


def _copy_sharing(target: nn.Module, convert: Callable[[Tensor], Tensor] | None = None) -> nn.Module:
    """A deep copy of the module tree whose tensors are the target's (or ``convert``-ed new ones)."""
    memo: dict[int, object] = {}
    for t in chain(target.parameters(), target.buffers()):
        if isinstance(t, nn.Parameter):
            memo[id(t)] = t if convert is None else nn.Parameter(convert(t.detach()), requires_grad=False)
        else:
            memo[id(t)] = t
    return copy.deepcopy(target, memo)


#: group size of the int4/int3/int2 self-drafts when the name gives none
DRAFT_GROUP_SIZE = 32
#: the output head of a quantized self-draft (its own copy; a tied target keeps its float head)
DRAFT_HEAD_SPEC = QuantizationSpec(bits=8, group_size=None, symmetric=True)


def draft_quantization(name: str) -> QuantizationSpec:
    """The `QuantizationSpec` of a draft name such as ``"int4"``, ``"hqq-int4-g64"`` or ``"int8"``:
    int8 is per-channel symmetric, lower widths use groups of `DRAFT_GROUP_SIZE` unless ``-gN`` says."""
    m = DRAFT_SCHEME_PATTERN.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a quantized draft name (int8, int4, int3, int2, optionally hqq- / -gN)")
    method, bits, group = m.group(1) or "rtn", int(m.group(2)), m.group(3)
    kwargs: dict = {"method": method, "bits": bits}
    if group is not None:
        kwargs["group_size"] = int(group)
    elif bits == 8 and method == "rtn":
        kwargs.update(group_size=None, symmetric=True)
    else:  # a draft is worth its acceptance rate: small groups (SmolLM2-135M: int4-g128 accepts ~53 %)
        kwargs["group_size"] = DRAFT_GROUP_SIZE
    return QuantizationSpec(**kwargs)


def quantized_copy(target: nn.Module, spec: QuantizationSpec) -> nn.Module:
    """The target with its linears replaced by `QuantLinear` modules quantized from its own weights; every other
    tensor (embeddings, norms) is shared with the target. The output head (tied or not) gets its own int8
    per-channel copy (`DRAFT_HEAD_SPEC`: nearly exact, a quarter of the float bytes, and at this model size the
    head is a third of a token's time) unless ``spec.modules_to_not_convert`` is given (then those modules stay
    float and the head follows ``spec`` like any other linear, a tied head staying float)."""
    from ..families import output_embedding_name
    from ..quant.core.mixed import bits_for_module
    from ..quant.methods import quantize_matrix
    from ..quant.modules.linear import QuantLinear, scale_dtype_of
    from ..quant.modules.replace import linearize, linears_to_quantize, set_submodule

    if spec.needs_calibration:
        raise ValueError(f"a self-draft cannot use calibrated method {spec.method!r}; use rtn or hqq")
    draft = _copy_sharing(target)
    head = output_embedding_name(draft) if spec.modules_to_not_convert is None else None
    skip = list(spec.modules_to_not_convert) if spec.modules_to_not_convert is not None else []
    names = linears_to_quantize(draft, skip + ([re.escape(head)] if head else []))
    linearize(draft, names)  # GPT-2's Conv1D -> the equivalent nn.Linear (the draft's own modules)
    for name in names + ([head] if head else []):
        linear = draft.get_submodule(name)
        module_spec = DRAFT_HEAD_SPEC if name == head else spec
        q = quantize_matrix(
            linear.weight,
            module_spec,
            bits_for_module(name, module_spec),
            scale_dtype=scale_dtype_of(module_spec.scale_dtype),
            name=name,
        )
        module = QuantLinear.from_quantized(linear, q, symmetric=module_spec.symmetric).to(linear.weight.device)
        module.requires_grad_(False)
        set_submodule(draft, name, module)
    return draft.eval()


def half_copy(target: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The target with every parameter converted to ``dtype`` (buffers shared)."""
    return _copy_sharing(target, lambda t: t.to(dtype)).eval()


# --- vocabulary checks and the entry point ----------------------------------------------------


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(model.config.vocab_size)


def check_draft_vocabulary(target: nn.Module, draft: nn.Module, tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ``ValueError`` when ``draft`` cannot share token ids with ``target``: different tokenizers
    (when both are given), else different vocabulary sizes or special token ids in the configs."""
    from ..vocab import check_same_vocabulary

    hint = "Speculative decoding needs a draft that uses the target's tokenizer."
    if tokenizer is not None and draft_tokenizer is not None:
        check_same_vocabulary(tokenizer, draft_tokenizer, names=("target", "draft"), hint=hint)
        return
    vt, vd = _vocab_size(target), _vocab_size(draft)
    if vt != vd:
        raise ValueError(
            f"the draft's vocabulary has {vd} ids and the target's {vt}. {hint} If both use the same "
            "tokenizer with a padded embedding, pass tokenizer= and draft_tokenizer= so it can be checked."
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a = getattr(target.config, key, None)
        b = getattr(draft.config, key, None)
        if a is not None and b is not None and a != b:
            raise ValueError(f"the draft's {key} is {b} and the target's {a}. {hint}")


def _draft_cache(target: nn.Module) -> dict[str, nn.Module]:
    return target.__dict__.setdefault("_hf_efficiency_drafts", {})


#: names shaped like a draft kind (a width, a method prefix, a dtype, early-exit) rather than a model id
_KIND_LIKE = re.compile(
    r"^(?:(?:[a-z]+-)?u?int\d+(?:-g\S*)?|(?:rtn|hqq|awq|gptq)-.*|b?float\d*|fp\d+|half|early-exit.*|n-?gram.*)$",
    re.IGNORECASE,
)
DRAFT_KINDS = (
    "'int8', 'int4', 'int3', 'int2' (optionally 'hqq-' before and '-gN' after), 'bfloat16', 'float16', "
    "'early-exit:K', 'ngram', a model object, or a local folder / Hub id of a smaller model"
)


def check_draft_name(name: str) -> None:
    """Raise ``ValueError`` for a draft name shaped like a draft kind that is not one (``"int7"``, ``"hqq-int9"``,
    ``"early-exit:x"``), before it could be taken for a Hub id; a local folder of that name is accepted."""
    if os.path.isdir(name):
        return
    m = EARLY_EXIT_PATTERN.match(name)
    if m is not None:
        if int(m.group(1)) < 1:
            raise ValueError(
                f"draft_model={name!r}: early-exit needs at least 1 decoder layer ('early-exit:K', K >= 1)"
            )
        return
    if DRAFT_SCHEME_PATTERN.match(name) or name in DRAFT_DTYPES or name == "ngram":
        return
    if _KIND_LIKE.match(name):
        raise ValueError(f"draft_model={name!r} is not a draft kind; allowed values: {DRAFT_KINDS}")


def draft_model_for(target: nn.Module, name: str, **load_kwargs) -> nn.Module:
    """The draft model a `SpeculativeSpec.draft` name stands for (built once per target and kept on
    it; call ``target.__dict__.pop("_hf_efficiency_drafts")`` after changing the target's weights)."""
    cache = _draft_cache(target)
    if name in cache:
        return cache[name]
    check_draft_name(name)
    m = EARLY_EXIT_PATTERN.match(name)
    if m is not None:
        model = early_exit_model(target, int(m.group(1)))
    elif DRAFT_SCHEME_PATTERN.match(name):
        model = quantized_copy(target, draft_quantization(name))
    elif name in DRAFT_DTYPES:
        model = half_copy(target, getattr(torch, name))
    else:
        from transformers import AutoModelForCausalLM

        path = os.fspath(name)
        load_kwargs.setdefault("dtype", getattr(target, "dtype", None))
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs).to(target.device).eval()
        check_draft_vocabulary(target, model)
    cache[name] = model
    return model


def build_drafter(
    target: nn.Module,
    draft: str | nn.Module | Drafter,
    spec: SpeculativeSpec | None = None,
    *,
    tokenizer=None,
    draft_tokenizer=None,
) -> Drafter:
    """A `Drafter` from a draft name (see `SpeculativeSpec.draft`), a model object or a `Drafter`."""
    spec = spec or SpeculativeSpec()
    vocab = _vocab_size(target)
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, str) and draft == "ngram":
        return NgramDrafter(vocab, spec.ngram_size)
    if isinstance(draft, (str, os.PathLike)):
        return ModelDrafter(draft_model_for(target, os.fspath(draft)), vocab)
    if isinstance(draft, nn.Module):
        check_draft_vocabulary(target, draft, tokenizer, draft_tokenizer)
        return ModelDrafter(draft, vocab)
    raise TypeError(f"draft_model must be a draft name, a path, a model or a Drafter, got {type(draft).__name__}")
