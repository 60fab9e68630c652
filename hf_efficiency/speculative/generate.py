"""The ``generate()`` entry of speculative decoding.

``import hf_efficiency`` wraps ``GenerationMixin.generate`` (in `registry.py`) so that::

    model.generate(input_ids, draft_model="int4")                         # a self-draft by name
    model.generate(input_ids, draft_model=small_model, speculative=SpeculativeConfig(num_draft_tokens=6))
    model.generate(input_ids, speculative={"draft": "ngram"})

and a model loaded with ``EfficiencyConfig(speculative=...)`` in its config decode speculatively with
a plain ``model.generate(input_ids)`` (``speculative=False`` turns it off for one call). Every other
call goes to transformers' generate untouched. The decoding itself runs as transformers'
``custom_generate`` callable, after transformers has prepared the generation config, the logits
processors and the stopping criteria.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..config import SpeculativeSpec, saved_section
from .loop import SpeculativeStats, speculative_generate

#: keyword arguments of ``generate`` that belong to speculative decoding
GENERATE_KWARGS = ("draft_model", "speculative", "draft_tokenizer")


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus the `SpeculativeStats` of the call."""

    speculative_stats: SpeculativeStats | None = None


def saved_spec(model) -> SpeculativeSpec | None:
    """The ``speculative`` section of the `EfficiencyConfig` the model was loaded with, if any."""
    return saved_section(model, "speculative")


def resolve_spec(model, speculative: Any) -> SpeculativeSpec:
    """``speculative=`` (a `SpeculativeSpec`, its dict, or ``True``) over the saved spec over defaults."""
    if isinstance(speculative, SpeculativeSpec):
        return speculative
    if isinstance(speculative, dict):
        return SpeculativeSpec.from_dict(speculative)
    if speculative is None or speculative is True:
        return saved_spec(model) or SpeculativeSpec()
    raise TypeError(
        f"speculative= must be a SpeculativeConfig, a dict, True or False, got {type(speculative).__name__}"
    )


def wants_speculative(model, kwargs: dict[str, Any]) -> bool:
    """Whether a ``generate`` call with ``kwargs`` decodes speculatively: when it passes ``draft_model=`` or
    ``speculative=``, or when the model carries a saved spec and the call does not ask for beam search,
    several sequences per prompt or transformers' own ``assistant_model=``."""
    speculative = kwargs.get("speculative")
    if speculative is False:
        if kwargs.get("draft_model") is not None:
            raise ValueError("speculative=False and draft_model= contradict each other")
        return False
    if kwargs.get("draft_model") is not None or speculative is not None:
        return True
    if saved_spec(model) is None:
        return False
    # a saved spec is a default: calls asking for what speculative decoding does not do keep transformers' path
    gen = kwargs.get("generation_config")
    for key in ("num_beams", "num_return_sequences"):
        if (kwargs.get(key) or getattr(gen, key, None) or 1) > 1:
            return False
    return kwargs.get("assistant_model") is None


def prepare_generate_kwargs(model, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn a speculative ``generate`` call into a transformers call with our ``custom_generate``;
    checks what transformers would otherwise let through silently."""
    kwargs = dict(kwargs)
    if kwargs.get("assistant_model") is not None:
        raise ValueError(
            "pass either assistant_model= (transformers' assisted generation) or draft_model= / "
            "speculative= (hf-efficiency's speculative decoding), not both"
        )
    if kwargs.get("custom_generate") is not None:
        raise ValueError("speculative decoding is itself a custom_generate; do not pass custom_generate= with it")
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if (
        isinstance(inputs, torch.Tensor)
        and inputs.dim() == 2
        and inputs.shape[0] > 1
        and kwargs.get("attention_mask") is None
    ):
        gen = kwargs.get("generation_config") or model.generation_config
        pad = kwargs.get("pad_token_id", getattr(gen, "pad_token_id", None))
        pads = [pad] if isinstance(pad, int) else list(pad or [])
        if any(bool((inputs == p).any()) for p in pads):
            raise ValueError(
                f"a batch of {inputs.shape[0]} prompts contains the pad token ({pad}) but no "
                "attention_mask was given: the rows have different lengths. Pass the tokenizer's "
                "attention_mask (tokenized with padding_side='left')."
            )
    for key in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if kwargs.get(key):
            raise ValueError(f"{key}=True is not supported with speculative decoding")
    kwargs["speculative"] = resolve_spec(model, kwargs.get("speculative"))
    if "streamer" in kwargs:
        kwargs["speculative_streamer"] = kwargs.pop("streamer")
    if kwargs.get("tokenizer") is not None:
        kwargs["speculative_tokenizer"] = kwargs["tokenizer"]
    kwargs["custom_generate"] = speculative_decoding
    return kwargs


def speculative_decoding(
    model,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    draft_model=None,
    speculative: SpeculativeSpec | None = None,
    draft_tokenizer=None,
    speculative_streamer=None,
    speculative_tokenizer=None,
    **model_kwargs: Any,
):
    """transformers ``custom_generate`` callable: speculative decoding of ``model`` with the draft
    ``draft_model`` (or ``speculative.draft``)."""
    spec = speculative if isinstance(speculative, SpeculativeSpec) else resolve_spec(model, speculative)
    cfg = generation_config
    if getattr(cfg, "num_beams", 1) > 1:
        raise ValueError(f"speculative decoding does not do beam search (num_beams={cfg.num_beams})")
    if getattr(cfg, "num_return_sequences", 1) > 1:
        raise ValueError("speculative decoding returns one sequence per prompt (num_return_sequences must be 1)")
    eos = getattr(cfg, "_eos_token_tensor", None)
    eos = eos if eos is not None else cfg.eos_token_id
    pad = getattr(cfg, "_pad_token_tensor", None)
    pad = int(pad) if pad is not None else cfg.pad_token_id
    sequences, stats = speculative_generate(
        model,
        draft_model if draft_model is not None else spec.draft,
        input_ids,
        model_kwargs.get("attention_mask"),
        max_new_tokens=cfg.max_length - input_ids.shape[1],
        spec=spec,
        do_sample=bool(cfg.do_sample),
        eos_token_id=eos,
        pad_token_id=pad,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        streamer=speculative_streamer,
        tokenizer=speculative_tokenizer,
        draft_tokenizer=draft_tokenizer,
    )
    if cfg.return_dict_in_generate:
        return SpeculativeDecoderOnlyOutput(sequences=sequences, speculative_stats=stats)
    return sequences
