"""The long fuzz run of every reader hf-efficiency owns (single process; not run in CI):

    python tools/fuzz_readers.py --examples 10000            # every reader, 10,000 inputs per fuzz test
    python tools/fuzz_readers.py --examples 500 -k gguf      # a pytest -k selection of the fuzz tests
    python tools/fuzz_readers.py --report fuzz-report.json   # also keep the counts as JSON

It runs the property-based tests of ``tests/fuzz`` (safetensors headers, EfficiencyConfig, GGUF, the GPTQ /
AWQ / compressed-tensors folders, the teacher-logit cache) with ``HF_EFFICIENCY_FUZZ_EXAMPLES`` set to
``--examples`` and a random seed, then prints, per reader, the inputs tried, how many were rejected with our
error type, accepted and verified, crashes (an exception that is not ours) and silent loads (an accepted
input the test's oracle finds inconsistent). Exits non-zero when any test failed. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_ENV = "HF_EFFICIENCY_FUZZ_EXAMPLES"
REPORT_ENV = "HF_EFFICIENCY_FUZZ_REPORT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per fuzz test (default 10000)")
    parser.add_argument("-k", dest="select", default="survive", help="pytest -k expression (default: every fuzz test)")
    parser.add_argument("--report", help="write the counts per reader to this JSON file")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: random, printed)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be >= 1")

    report = args.report or os.path.join(tempfile.mkdtemp(prefix="hf-efficiency-fuzz-report-"), "report.json")
    os.environ[EXAMPLES_ENV] = str(args.examples)
    os.environ[REPORT_ENV] = os.path.abspath(report)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"fuzzing with {args.examples} inputs per test, hypothesis seed {seed} (rerun with --seed {seed})")
    os.chdir(REPO)

    import pytest

    start = time.time()
    code = pytest.main(["tests/fuzz", "-q", "-p", "no:cacheprovider", "-k", args.select, f"--hypothesis-seed={seed}"])
    elapsed = time.time() - start
    if not os.path.exists(report):
        print("no fuzz test ran", file=sys.stderr)
        return int(code) or 1
    with open(report) as fh:
        counts = json.load(fh)
    print(f"\nlong fuzz run: {elapsed / 60:.1f} min, seed {seed}")
    print(f"{'reader':<72} {'inputs':>8} {'rejected':>9} {'accepted':>9} {'crashes':>8} {'silent':>7}")
    for reader, c in counts.items():
        print(f"{reader:<72} {c['tried']:>8} {c['rejected']:>9} {c['accepted']:>9} {c['crashes']:>8} {c['silent']:>7}")
    if args.report:
        print(f"counts written to {args.report}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
