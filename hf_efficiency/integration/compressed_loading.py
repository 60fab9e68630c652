"""``from_pretrained(..., efficiency_config=EfficiencyConfig(keep_compressed=True))``: the call routed
to the community-format readers (kept apart from `registry`, which only wires it)."""

from __future__ import annotations

from typing import Any

from ..config import SECTIONS


def from_pretrained_compressed(cls, args: tuple, kwargs: dict[str, Any]):
    """Load ``args[0]`` (a folder or ``.gguf`` file; ``gguf_file=`` names a file in the folder) with
    `load_compressed`, for the model class ``cls`` that ``from_pretrained`` was called on. Sections of
    the requested `EfficiencyConfig` other than ``quantization`` (attention, speculative ...) are kept."""
    from ..formats import load_compressed

    kwargs = dict(kwargs)
    requested = kwargs.pop("quantization_config")
    if requested.quantization is not None:
        raise ValueError(
            "keep_compressed=True loads the checkpoint's own quantization; remove the quantization section "
            "(re-quantizing a compressed checkpoint is done by loading it de-quantized without keep_compressed)"
        )
    path = args[0] if args else kwargs.pop("pretrained_model_name_or_path", None)
    if path is None:
        raise ValueError("keep_compressed=True needs a local folder or .gguf file to load")
    gguf_file = kwargs.pop("gguf_file", None)
    kwargs.pop("config", None)  # rebuilt from the checkpoint, without its foreign quantization_config
    for key in (
        "_from_auto",
        "_from_pipeline",
        "trust_remote_code",
        "adapter_kwargs",
        "revision",
        "cache_dir",
        "local_files_only",
        "token",
        "subfolder",
    ):
        kwargs.pop(key, None)
    model_class = None if cls.__name__ == "PreTrainedModel" else cls
    sections = {
        name: getattr(requested, name)
        for name in SECTIONS
        if name != "quantization" and getattr(requested, name, None) is not None
    }
    if sections:
        kwargs["sections"] = sections
    return load_compressed(path, gguf_file, model_class=model_class, **kwargs)
