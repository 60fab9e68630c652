"""The model card (``README.md``) of a model quantized with hf-efficiency.

The template ``quantized.md`` lives in the top-level ``model_cards/`` folder of the source tree
and is installed as the resource package ``hf_efficiency.model_cards``. It uses plain
``{{placeholder}}`` substitution (no Jinja2); the YAML front matter comes from
`huggingface_hub.ModelCardData`.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers.utils import logging

from ..config import EfficiencyConfig
from ..quant.methods import get_method

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "quantized.md"
EVAL_FILE = "hf_efficiency_eval.json"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_METRIC_KEYS = ("perplexity", "reference_perplexity", "tokens_per_s", "protocol")


def template_text(name: str = TEMPLATE_NAME) -> str:
    """The text of a card template: the installed ``hf_efficiency.model_cards`` resource, else
    ``<repo root>/model_cards/`` of a source checkout."""
    try:
        resource = importlib.resources.files("hf_efficiency.model_cards") / name
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except (ModuleNotFoundError, TypeError, AttributeError, OSError):
        pass
    here = Path(__file__).resolve()
    for folder in (here.parents[1] / "model_cards", here.parents[2] / "model_cards"):  # installed, checkout
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    raise FileNotFoundError(f"model card template {name!r} not found (hf_efficiency.model_cards or model_cards/)")


def _fill(template: str, values: dict[str, Any]) -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise KeyError(f"model card template placeholder(s) without a value: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def quantization_stats(model: nn.Module) -> dict[str, Any]:
    """Counts and bytes of the quantized linear layers and of the whole model, as measured by the
    evaluation harness (:func:`hf_efficiency.evaluate.weight_bytes`)."""
    from ..evaluate import weight_bytes

    wb = weight_bytes(model)
    return {
        "quantized_layers": wb["quantized_modules"],
        "quantized_weights": wb["quantized_params"],
        "quantized_bytes": wb["quantized"],
        "bits_per_weight": wb["bits_per_weight"],
        "total_bytes": wb["total"],
    }


def _read_metrics(model: nn.Module) -> dict[str, Any] | None:
    source = getattr(model.config, "_name_or_path", None)
    if source and os.path.isdir(source):
        path = os.path.join(source, EVAL_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return getattr(model, "hf_efficiency_metrics", None)


def _normalize_metrics(metrics: Any) -> dict[str, Any]:
    """Keep the known keys; accept ``reference: {"perplexity": ...}`` and derive a protocol line
    from an `hf_efficiency.evaluate.EvalResult` dict (``text_source``/``window``/``tokens``)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict or None, got {type(metrics).__name__}")
    out = {k: metrics[k] for k in _METRIC_KEYS if metrics.get(k) is not None}
    ref = metrics.get("reference")
    if "reference_perplexity" not in out and isinstance(ref, dict) and ref.get("perplexity") is not None:
        out["reference_perplexity"] = ref["perplexity"]
    if "protocol" not in out and metrics.get("text_source"):
        parts = [str(metrics["text_source"])]
        if metrics.get("window"):
            parts.append(f"windows of {metrics['window']} tokens")
        if metrics.get("tokens"):
            parts.append(f"{metrics['tokens']} predicted tokens")
        out["protocol"] = ", ".join(parts)
    for key in ("perplexity", "reference_perplexity", "tokens_per_s"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], (int, float))):
            raise TypeError(f"metrics[{key!r}] must be a number, got {out[key]!r}")
    return out


def _metrics_section(m: dict[str, Any]) -> str:
    rows = []
    if "perplexity" in m:
        rows.append(f"| perplexity | {m['perplexity']:.3f} |")
    if "reference_perplexity" in m:
        rows.append(f"| fp32 reference perplexity | {m['reference_perplexity']:.3f} |")
        if "perplexity" in m and m["reference_perplexity"]:
            rows.append(f"| perplexity delta | {100.0 * (m['perplexity'] / m['reference_perplexity'] - 1.0):+.2f} % |")
    if "tokens_per_s" in m:
        rows.append(f"| decode tokens/s | {m['tokens_per_s']:.2f} |")
    if not rows and "protocol" not in m:
        return ""
    text = "\n## Evaluation\n\n"
    if rows:
        text += "| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n"
    if "protocol" in m:
        text += f"\nEvaluation protocol: {m['protocol']}\n"
    return text


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return name in names or name.endswith("ForCausalLM")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def render_model_card(
    model: nn.Module,
    *,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    tags: list[str] | str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Render the model card of a model carrying an `EfficiencyConfig`.

    ``base_model`` defaults to ``quantization_config.base_model``; ``metrics`` (keys
    ``perplexity``, ``reference_perplexity``, ``tokens_per_s``, ``protocol``) default to
    ``hf_efficiency_eval.json`` in the model's source folder, else ``model.hf_efficiency_metrics``.
    The evaluation section appears only when metrics are known.
    """
    cfg = getattr(model.config, "quantization_config", None)
    if not isinstance(cfg, EfficiencyConfig):
        raise ValueError("render_model_card needs a model whose config.quantization_config is an EfficiencyConfig")
    if isinstance(tags, str):
        tags = [tags]
    if tags is not None and not all(isinstance(t, str) for t in tags):
        raise TypeError(f"tags must be a list of strings, got {tags!r}")
    base_model = base_model if base_model is not None else cfg.base_model
    m = _normalize_metrics(metrics if metrics is not None else _read_metrics(model))
    spec = cfg.quantization
    stats = quantization_stats(model)
    causal = _is_causal_lm(model)

    card_tags = ["hf-efficiency"]
    if spec is not None:
        card_tags += ["quantized", f"{spec.bits}-bit", spec.method]
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation" if causal else None,
        tags=_unique(card_tags + list(tags or [])),
        **({"base_model_relation": "quantized"} if base_model and spec is not None else {}),
    )

    dash = "-"
    if spec is not None:
        how = describe_method(cfg)
        training = getattr(model, "hf_efficiency_training", None)
        if training:
            how = f"{how}, after {training}"
        per = "output channel" if spec.group_size is None else f"{spec.group_size} input weights"
        offset = "" if spec.symmetric else (" and uint8 zero point" if spec.zero_point == "integer" else " and minimum")
        layout = f"one {spec.scale_dtype} scale{offset} per {per}"
    else:
        how, layout = "applying its `EfficiencyConfig` (no weight quantization)", "no scales"
    bpw = stats["bits_per_weight"]
    values = {
        "card_data": data.to_yaml(),
        "title": (repo_id or f"{base_model or type(model).__name__} (hf-efficiency)").split("/")[-1],
        "repo_id": repo_id or "<repo_id>",
        "summary": (f"a {spec.bits}-bit weight-quantized version of " if spec else "a version of ")
        + (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a transformers model"),
        "how": how,
        "scale_layout": layout,
        "method": spec.method if spec else dash,
        "bits": spec.bits if spec else dash,
        "group_size": (spec.group_size or "per output channel") if spec else dash,
        "symmetric": spec.symmetric if spec else dash,
        "clip": spec.clip if spec else dash,
        "scale_dtype": spec.scale_dtype if spec else dash,
        "num_quantized": stats["quantized_layers"],
        "bits_per_weight": dash if bpw is None or math.isnan(bpw) else f"{bpw:.3f}",
        "quantized_bytes": _size(stats["quantized_bytes"]),
        "total_bytes": _size(stats["total_bytes"]),
        "metrics_section": _metrics_section(m),
        "config_json": cfg.to_json_string().strip(),
        "auto_class": "AutoModelForCausalLM" if causal else "AutoModel",
    }
    return ModelCard(_fill(template_text(), values))


def describe_method(cfg: EfficiencyConfig) -> str:
    """One sentence fragment saying how the weights (and activations) were quantized."""
    spec, cal, act = cfg.quantization, getattr(cfg, "calibration", None), getattr(cfg, "activations", None)
    data = ""
    if cal is not None and cfg.needs_calibration:
        source = cal.dataset if isinstance(cal.dataset, str) else f"{len(cal.dataset)} given texts"
        data = f", calibrated on {cal.samples} x {cal.sequence_length} tokens of `{source}`"
    how = get_method(spec.method).describe(spec.options, spec.clip)
    extras = []
    if spec.rotation is not None:
        extras.append(
            "hidden states rotated by random Hadamard matrices before quantizing (QuaRot; "
            + (
                "folded into the weights"
                if spec.rotation == "hadamard-folded"
                else "folded into the weights, and the MLP down projections' inputs rotated at run time"
            )
            + f", seed {spec.rotation_seed})"
        )
    if spec.outliers:
        extras.append(f"{spec.outliers:.1%} of the weights of every row kept exactly in float16")
    if spec.module_bits:
        widths = sorted(set(spec.module_bits.values()) | {spec.bits})
        extras.append(
            f"mixed precision ({'/'.join(map(str, widths))} bits"
            + (f", allocated to a mean of {spec.target_bits} bits by measured sensitivity" if spec.target_bits else "")
            + ")"
        )
    if act is not None:
        extras.append(
            f"int8 activations ({act.mode}"
            + (f", SmoothQuant alpha={act.smoothquant}" if act.smoothquant else "")
            + ")"
        )
    return how + data + "".join(f"; {e}" for e in extras)


def save_model_card(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    tags: list[str] | str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Render the model card and write it to ``folder/README.md``; returns the path."""
    card = render_model_card(model, base_model=base_model, metrics=metrics, tags=tags, repo_id=repo_id)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


EXPORT_TEMPLATE_NAME = "exported.md"
FORMAT_TITLES = {"compressed-tensors": "compressed-tensors", "gptq": "GPTQ", "awq": "AWQ", "gguf": "GGUF"}


def serve_commands(export_format: str, repo_id: str, gguf_file: str = "model.gguf") -> str:
    """Markdown: how each engine that reads ``export_format`` serves ``repo_id`` (exact commands)."""
    if export_format == "gguf":
        return (
            "llama.cpp (CPU or GPU):\n\n"
            f'```bash\nllama-cli -hf {repo_id} -p "The capital of France is" -n 32\n'
            f'# or, with the file downloaded:\nllama-cli -m {gguf_file} -p "The capital of France is" -n 32\n'
            f"llama-server -m {gguf_file} --port 8080\n```\n\n"
            f"Ollama: `ollama run hf.co/{repo_id}`, or with the file downloaded, a `Modelfile` holding\n\n"
            f"```\nFROM ./{gguf_file}\n```\n\n"
            "and `ollama create my-model -f Modelfile && ollama run my-model`. LM Studio opens the file as is.\n\n"
            "hf-efficiency reads it back keeping its bits: "
            f'`hf_efficiency.formats.load_gguf("{gguf_file}")`; transformers de-quantizes it: '
            f'`AutoModelForCausalLM.from_pretrained("{repo_id}", gguf_file="{gguf_file}")`.'
        )
    quantization = {"gptq": " --quantization gptq", "awq": " --quantization awq"}.get(export_format, "")
    text = (
        f"vLLM:\n\n```bash\nvllm serve {repo_id}{quantization} --dtype bfloat16\n```\n\n"
        "SGLang:\n\n"
        f"```bash\npython -m sglang.launch_server --model-path {repo_id}\n```\n\n"
    )
    if export_format == "compressed-tensors":
        text += (
            "transformers (with `pip install compressed-tensors`):\n\n"
            f"```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n```\n'
        )
    else:
        text += (
            "Text Generation Inference:\n\n"
            f"```bash\ntext-generation-launcher --model-id {repo_id} --quantize {export_format}\n```\n"
        )
    text += (
        "\nhf-efficiency reads it back keeping its bits: "
        f'`from_pretrained("{repo_id}", efficiency_config={{"keep_compressed": True}})`.'
    )
    return text


def render_export_card(
    model: nn.Module,
    report: Any,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    tags: list[str] | str | None = None,
) -> ModelCard:
    """The model card of an export (an `hf_efficiency.export.ExportReport` of ``model``): which engines
    load it with the exact commands, and every module the export converted with its measured change."""
    cfg = getattr(model.config, "quantization_config", None)
    cfg = cfg if isinstance(cfg, EfficiencyConfig) else None
    if isinstance(tags, str):
        tags = [tags]
    base_model = base_model if base_model is not None else (cfg.base_model if cfg else None)
    fmt = report.format
    title = FORMAT_TITLES.get(fmt, fmt)
    repo = repo_id or "<repo_id>"
    gguf_file = next((f for f in report.files if f.endswith(".gguf")), "model.gguf")
    card_tags = ["hf-efficiency", "quantized", fmt] + ([cfg.quantization.method] if cfg and cfg.quantization else [])
    data = ModelCardData(
        base_model=base_model,
        library_name="gguf" if fmt == "gguf" else "transformers",
        pipeline_tag="text-generation" if _is_causal_lm(model) else None,
        tags=_unique(card_tags + list(tags or [])),
        **({"base_model_relation": "quantized"} if base_model else {}),
    )
    stored = sorted(set(report.quantized.values()))
    if report.exact:
        exactness = "every quantized weight is written exactly as hf-efficiency computes with it."
    else:
        exactness = (
            f"{len(report.changes)} of {len(report.quantized)} quantized layers could not be held exactly by "
            f"{title} and were converted to its nearest grid; the measured change of each is listed below."
        )
    changes = ""
    if report.changes:
        rows = [
            f"| `{name}` | {c.max_change:.3e} | {c.rms_change:.3e} | {'; '.join(c.reasons)} |"
            for name, c in report.changes.items()
        ]
        changes = (
            "\n### Weights changed by the export\n\n"
            "| module | max change (relative) | rms change (relative) | why |\n|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
    values = {
        "card_data": data.to_yaml(),
        "title": (repo_id or f"{base_model or type(model).__name__} ({title})").split("/")[-1],
        "summary": "a weight-quantized version of "
        + (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a transformers model"),
        "format_title": title,
        "how": describe_method(cfg) if cfg and cfg.quantization else "loading a compressed checkpoint",
        "exactness": exactness,
        "serve_section": serve_commands(fmt, repo, gguf_file),
        "method": cfg.quantization.method if cfg and cfg.quantization else "-",
        "num_quantized": len(report.quantized),
        "stored_as": ", ".join(stored) if stored else "-",
        "num_float": len(report.float_modules),
        "num_changed": len(report.changes),
        "changes_section": changes,
        "config_json": cfg.to_json_string().strip() if cfg else "{}",
    }
    return ModelCard(_fill(template_text(EXPORT_TEMPLATE_NAME), values))
