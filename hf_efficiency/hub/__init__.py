"""Hugging Face Hub integration: the hf-efficiency model card and `push_to_hub`."""

from .model_card import quantization_stats, render_model_card, save_model_card, template_text
from .push import push_to_hub

__all__ = ["push_to_hub", "quantization_stats", "render_model_card", "save_model_card", "template_text"]
