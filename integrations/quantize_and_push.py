"""Quantize a model with hf-efficiency, evaluate it, and push it to the Hub with its model card.

    python integrations/quantize_and_push.py --model PATH_OR_ID --bits 4 --group-size 128 --repo me/name
    python integrations/quantize_and_push.py --bits 8 --group-size none --out smollm2-int8   # no push

MODEL defaults to the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_efficiency  # noqa: F401  (registers the plugin)
from hf_efficiency import EfficiencyConfig
from hf_efficiency.demo import resolve_model_path
from hf_efficiency.evaluate import evaluate


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--num-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=None, help="also save the folder here")
    ap.add_argument("--repo", default=None, help="Hub repo id to push to (needs network and a token)")
    args = ap.parse_args(argv)

    group = None if args.group_size.lower() == "none" else int(args.group_size)
    cfg = EfficiencyConfig(quantization={"bits": args.bits, "group_size": group, "symmetric": args.symmetric})
    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, efficiency_config=cfg, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = evaluate(model, tokenizer, text=args.text, num_tokens=args.num_tokens, window=args.window, speed=False)
    model.hf_efficiency_metrics = {
        "perplexity": result.perplexity,
        "protocol": f"{result.text_source}, {result.n_windows} x {result.window} tokens",
    }
    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        from hf_efficiency.hub import save_model_card

        save_model_card(model, args.out)
    if args.repo:
        model.push_to_hub(args.repo)
        tokenizer.push_to_hub(args.repo)
    print(f"perplexity {result.perplexity:.3f} on {result.text_source}")
    return result.to_dict()


if __name__ == "__main__":
    main()
