"""setuptools shim: ships `hf_efficiency_autoload.pth` at the root of site-packages.

The .pth line imports `_hf_efficiency_autoload`, which only installs a tiny import hook (no
torch/transformers import at interpreter start): when `transformers.modeling_utils` is first
imported, it imports `hf_efficiency`, so checkpoints of ours load with a plain
`from_pretrained` even where the user never wrote `import hf_efficiency`.
Set HF_EFFICIENCY_NO_AUTOLOAD=1 to disable.

It also installs the top-level ``model_cards/`` folder as the resource package
``hf_efficiency.model_cards`` (read by `hf_efficiency.hub.model_card`). Passing ``packages=``
here replaces setup.cfg's ``packages = find_namespace:``, so the same discovery (setup.cfg's
``[options.packages.find] include``) is run here and the mapped package is added to it.
"""

import configparser
import os

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

PTH = "hf_efficiency_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_CARDS = "hf_efficiency.model_cards"


def packages() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(HERE, "setup.cfg"))
    include = cfg.get("options.packages.find", "include", fallback="hf_efficiency\nhf_efficiency.*").split()
    found = find_namespace_packages(where=HERE, include=include)
    return sorted(set(found) - {MODEL_CARDS}) + [MODEL_CARDS]


setup(
    cmdclass={"build_py": BuildPyWithPth},
    packages=packages(),
    package_dir={MODEL_CARDS: "model_cards"},
    package_data={MODEL_CARDS: ["*.md"], "hf_efficiency.quant": ["csrc/*.cpp"]},
)
