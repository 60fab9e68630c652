"""Prints how many inputs each reader's fuzz tests tried, rejected and accepted (and writes them as JSON to
``$HF_EFFICIENCY_FUZZ_REPORT`` when set)."""

from __future__ import annotations

import os

from fuzz.fuzzkit import REPORT_ENV, STATS, summary_lines, write_report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not STATS:
        return
    terminalreporter.section("reader fuzzing (inputs per reader)")
    for line in summary_lines():
        terminalreporter.write_line(line)
    if os.environ.get(REPORT_ENV):
        write_report(os.environ[REPORT_ENV])
