"""Copy the generated quantization table into README.md between its markers.

    python benchmarks/readme_table.py
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- quantization-table:start -->", "<!-- quantization-table:end -->"


def main() -> None:
    with open(os.path.join(ROOT, "benchmarks", "results", "quantization.md")) as fh:
        table = fh.read().strip()
    path = os.path.join(ROOT, "README.md")
    with open(path) as fh:
        readme = fh.read()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    readme = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", readme, flags=re.S)
    with open(path, "w") as fh:
        fh.write(readme)
    print(f"README.md: table of {table.count(chr(10)) - 3} rows copied")


if __name__ == "__main__":
    main()
