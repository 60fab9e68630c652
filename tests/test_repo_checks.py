"""Repository checks that CI runs with the tests: lint, format, import structure, docs build."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_ruff_lint_passes():
    r = _run(sys.executable, "-m", "ruff", "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_applied():
    r = _run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_import_cycle_private_import_or_integration_import_from_a_method_package():
    r = _run(sys.executable, os.path.join("tools", "check_imports.py"))
    assert r.returncode == 0 and "no cycle" in r.stdout, r.stdout + r.stderr


def test_import_checker_reports_a_cycle_and_a_private_import(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import check_imports
    finally:
        sys.path.pop(0)
    edges = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}, "d": {"a": "d.py:4"}}
    (cycle,) = check_imports.find_cycles(edges)
    assert cycle.startswith("import cycle among a, b, c:") and "d" not in cycle.split(":")[0]
    assert check_imports.find_cycles({"a": {"b": "x"}, "b": {}}) == []


def test_docs_site_builds_without_warnings(tmp_path):
    r = _run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (
        tmp_path / "site" / "quantization" / "index.html"
    ).is_file()
