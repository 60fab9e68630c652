"""Copy a generated table into README.md (and any docs page carrying the same markers) between its markers.

python benchmarks/readme_table.py            # quantization (benchmarks/results/quantization.md)
python benchmarks/readme_table.py memory     # memory (benchmarks/results/memory.md)
python benchmarks/readme_table.py engines    # serving engines (benchmarks/results/engines.md)
python benchmarks/readme_table.py gemma3     # Gemma-3-270M (benchmarks/results/gemma3.md)

NAME is the results file's name and the README's ``<!-- NAME-table:start -->`` / ``<!-- NAME-table:end -->``
markers.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(name: str = "quantization") -> None:
    start, end = f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->"
    with open(os.path.join(ROOT, "benchmarks", "results", f"{name}.md")) as fh:
        table = fh.read().strip()
    path = os.path.join(ROOT, "README.md")
    with open(path) as fh:
        readme = fh.read()
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md lacks the {start} / {end} markers")
    docs = os.path.join(ROOT, "docs")
    pages = [os.path.join(d, f) for d, _, fs in os.walk(docs) for f in fs if f.endswith(".md")]
    for page in [path] + sorted(pages):
        with open(page) as fh:
            text = fh.read()
        if start not in text or end not in text:
            continue
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}", text, flags=re.S)
        with open(page, "w") as fh:
            fh.write(text)
        print(f"{os.path.relpath(page, ROOT)}: {name} table copied")


if __name__ == "__main__":
    main(*sys.argv[1:2])
