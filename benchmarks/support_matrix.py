"""The README's family x capability support table, generated from test outcomes.

Runs the family test matrix (tests/test_families.py, tests/memory/test_families.py, tests/quant/test_experts.py)
with pytest, reads its JUnit report and writes one cell per family and capability: "yes" when every test of
that cell passed, "FAIL (n)" when n failed, "-" when no test covers it. Every cell is a test, not a claim.

    python benchmarks/support_matrix.py                  # runs pytest, writes results/support.{md,json}
    python benchmarks/readme_table.py support            # copies the table into README.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from family_models import FAMILIES  # noqa: E402

TEST_FILES = ["tests/test_families.py", "tests/memory/test_families.py", "tests/quant/test_experts.py"]
#: column -> (test file, test function prefix, extra id token or None)
COLUMNS = {
    "RTN": ("tests/test_families.py", "test_quantize_save_and_reload_in_a_fresh_process", "rtn"),
    "HQQ": ("tests/test_families.py", "test_quantize_save_and_reload_in_a_fresh_process", "hqq"),
    "AWQ": ("tests/test_families.py", "test_quantize_save_and_reload_in_a_fresh_process", "awq"),
    "GPTQ": ("tests/test_families.py", "test_quantize_save_and_reload_in_a_fresh_process", "gptq"),
    "W8A8 + SmoothQuant": ("tests/test_families.py", "test_quantize_save_and_reload_in_a_fresh_process", "w8a8"),
    "folding exact": ("tests/test_families.py", "test_scale_folding_keeps_float_outputs", None),
    "memory estimate": ("tests/memory/test_families.py", "test_", None),
    "speculative": ("tests/test_families.py", "test_speculative_decoding_is_greedy_identical", None),
    "block-wise attention": ("tests/test_families.py", "test_blockwise_attention_matches_eager", None),
    "int8 KV cache": ("tests/test_families.py", "test_quantized_kv_cache_decodes", None),
    "LoRA": ("tests/test_families.py", "test_lora_training_step", None),
    "QLoRA": ("tests/test_families.py", "test_qlora_training_step", None),
}
NAMES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "opt": "OPT",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "mixtral": "Mixtral",
}


def _tokens(name: str) -> set[str]:
    match = re.search(r"\[(.*)\]$", name)
    return set(match.group(1).split("-")) if match else set()


def run_tests(report: str) -> int:
    files = [f for f in TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def outcomes(report: str) -> list[tuple[str, str, str]]:
    """``(file, test name, outcome)`` of every test case in a JUnit report."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed"
            elif child.tag == "skipped":
                state = "skipped"
        out.append((file, case.get("name", ""), state))
    return out


def table(results: list[tuple[str, str, str]]) -> tuple[str, dict]:
    cells: dict[str, dict[str, str]] = {}
    for family in FAMILIES:
        row = cells[family] = {}
        for column, (file, prefix, token) in COLUMNS.items():
            states = [
                s
                for f, n, s in results
                if f.endswith(file)
                and n.startswith(prefix)
                and family in _tokens(n)
                and (token is None or token in _tokens(n))
            ]
            failed = sum(s != "passed" for s in states)
            row[column] = "-" if not states else ("yes" if not failed else f"FAIL ({failed}/{len(states)})")
    head = "| family | " + " | ".join(COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [head, rule] + [
        f"| {NAMES.get(f, f)} | " + " | ".join(cells[f][c] for c in COLUMNS) + " |" for f in FAMILIES
    ]
    return "\n".join(lines), cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="an existing JUnit XML report to read instead of running pytest")
    args = parser.parse_args()
    report = args.report
    if report is None:
        report = os.path.join(tempfile.mkdtemp(), "support.xml")
        run_tests(report)
    results = outcomes(report)
    md, cells = table(results)
    total = len(results)
    passed = sum(s == "passed" for _, _, s in results)
    md += (
        f"\n\nEach cell is a test of `tests/test_families.py` / `tests/memory/test_families.py` on a tiny random model "
        f"built from the family's transformers config ({passed} of {total} tests passed; "
        "`python benchmarks/support_matrix.py`). Mixture-of-experts rows: AWQ and GPTQ calibrate attention (and "
        "Qwen2-MoE's shared expert); the routed experts (`QuantExperts`) are rounded to nearest in the same format, "
        "weight-only under W8A8; routers stay float."
    )
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "support.md"), "w") as fh:
        fh.write(md + "\n")
    with open(os.path.join(out, "support.json"), "w") as fh:
        json.dump({"cells": cells, "passed": passed, "total": total}, fh, indent=1)
    print(md)


if __name__ == "__main__":
    main()
