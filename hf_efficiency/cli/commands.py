"""The one command table: every ``hf-efficiency`` command (and ``optimum-cli hf-efficiency`` leaf) is a
`Command` row in `COMMANDS`; its arguments, run function and printer live in the module named after it.

Adding a command: write ``cli/NAME.py`` with ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``,
``run(args) -> dict`` and ``print_human(result)``, then add ``Command.of("NAME", NAME)`` below.
Both CLIs pick it up, ``--json`` included.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import convert, distill, estimate, export, generate, quantize
from . import eval as eval_


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, description, argument definitions, run function
    (parsed arguments -> result dict; keys starting with ``_`` are left out of ``--json``) and
    human-readable printer of the result."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    print_human: Callable[[dict[str, Any]], None]

    @classmethod
    def of(cls, name: str, module: ModuleType) -> Command:
        """The command whose parts module ``module`` defines."""
        return cls(name, module.HELP, module.DESCRIPTION, module.add_arguments, module.run, module.print_human)

    def configure(self, parser: argparse.ArgumentParser) -> None:
        """Give ``parser`` (a ``hf-efficiency`` subparser or an optimum-cli leaf parser) this command's
        description and arguments, plus ``--json``."""
        parser.description = self.description
        self.add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print JSON instead of a readable summary")
        parser.set_defaults(command=self.name)

    def add_to(self, subparsers: Any) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description)
        self.configure(parser)
        return parser


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command.of("quantize", quantize),
        Command.of("convert", convert),
        Command.of("export", export),
        Command.of("eval", eval_),
        Command.of("estimate", estimate),
        Command.of("distill", distill),
        Command.of("generate", generate),
    )
}
