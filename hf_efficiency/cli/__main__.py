"""``python -m hf_efficiency.cli``: the `hf-efficiency` console script."""

import sys

from . import main

sys.exit(main())
