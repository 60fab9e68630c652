"""MkDocs hook: publish the benchmark charts in ``benchmarks/results/`` with the site.

The pages link to a chart the way GitHub resolves it from ``docs/`` (``../benchmarks/results/memory.png``),
so the same Markdown works when read on GitHub. MkDocs only knows files under ``docs/``: this hook adds
every ``benchmarks/results/*.png`` to the site's files and rewrites those links to the published copy.
Tables need no hook: pymdownx.snippets includes ``benchmarks/results/*.md`` directly.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
LINK = re.compile(r"\]\((?:\.\./)+" + re.escape(RESULTS) + r"/([^)\s]+\.png)\)")


def on_files(files, config):
    for png in sorted((ROOT / RESULTS).glob("*.png")):
        files.append(
            File(
                f"{RESULTS}/{png.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)

    def to_site(match):
        target = f"{RESULTS}/{match.group(1)}"
        return f"]({posixpath.relpath(target, here or '.')})"

    return LINK.sub(to_site, markdown)
