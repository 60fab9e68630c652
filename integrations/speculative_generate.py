"""Speculative decoding inside a stock transformers script: load, stream, save the draft choice.

    python integrations/speculative_generate.py --model MODEL --draft int4 --prompt "In the beginning"
    python integrations/speculative_generate.py --model MODEL --draft ngram --save-to DIR   # DIR decodes
        speculatively with a plain `AutoModelForCausalLM.from_pretrained(DIR).generate(...)`

Only two lines differ from plain transformers code: ``import hf_efficiency`` and the ``draft_model=`` /
``speculative=`` arguments of ``generate`` (or the ``efficiency_config=`` of ``from_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import hf_efficiency
from hf_efficiency import EfficiencyConfig, SpeculativeConfig
from hf_efficiency.demo import resolve_model_path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target folder or Hub id (default: bundled SmolLM2)")
    p.add_argument("--draft", default="int4")
    p.add_argument("--prompt", default="In the beginning God created")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--stream", action="store_true", help="print tokens as they are accepted (TextStreamer)")
    p.add_argument("--save-to", default=None, help="save the target with EfficiencyConfig(speculative=...) here")
    args = p.parse_args(argv)

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = SpeculativeConfig(draft=args.draft, num_draft_tokens=args.num_draft_tokens)
    if args.save_to:
        # the draft choice travels in config.json; a plain from_pretrained + generate() uses it
        model = AutoModelForCausalLM.from_pretrained(path, efficiency_config=EfficiencyConfig(speculative=spec))
        model.save_pretrained(args.save_to)
        tokenizer.save_pretrained(args.save_to)
        model = AutoModelForCausalLM.from_pretrained(args.save_to)
        kwargs = {}
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
        kwargs = {"draft_model": args.draft, "speculative": spec}
    model.eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True) if args.stream else None
    out = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        streamer=streamer,
        return_dict_in_generate=True,
        **kwargs,
    )
    plain = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, speculative=False)
    stats = out.speculative_stats
    result = {
        "hf_efficiency": hf_efficiency.__version__,
        "draft": args.draft,
        "text": tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1] :], skip_special_tokens=True),
        "identical_to_plain_greedy": bool(torch.equal(out.sequences, plain)),
        **stats.to_dict(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
