"""setuptools shim: ships `hf_efficiency_autoload.pth` at the root of site-packages.

The .pth line imports `_hf_efficiency_autoload`, which only installs a tiny import hook (no
torch/transformers import at interpreter start): when `transformers.modeling_utils` is first
imported, it imports `hf_efficiency`, so checkpoints of ours load with a plain
`from_pretrained` even where the user never wrote `import hf_efficiency`.
Set HF_EFFICIENCY_NO_AUTOLOAD=1 to disable.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hf_efficiency_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
