"""Loaded from `hf_efficiency_autoload.pth` at interpreter start; must stay import-light.

Installs a one-shot import hook: right after `transformers.modeling_utils` has been executed,
`hf_efficiency` is imported, which registers the `hf_efficiency` quantizer. A checkpoint of ours
then loads correctly with a plain `from_pretrained`, even without `import hf_efficiency`.
Disable with the environment variable HF_EFFICIENCY_NO_AUTOLOAD=1.
"""

import importlib.abc
import importlib.util
import os
import sys

TARGET = "transformers.modeling_utils"


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids recursing into ourselves
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                import hf_efficiency  # noqa: F401  (registers on import)
            except Exception as exc:  # never break transformers because of the plugin
                import warnings

                warnings.warn(f"hf-efficiency is installed but failed to register with transformers: {exc!r}")

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if os.environ.get("HF_EFFICIENCY_NO_AUTOLOAD", "").strip() not in ("", "0"):
        return
    if TARGET in sys.modules:
        return
    if not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


install()
