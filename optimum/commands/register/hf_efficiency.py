"""`optimum-cli hf-efficiency ...`: optimum's CLI plugin hook (PEP 420 namespace, no __init__.py).

optimum imports this file at CLI start-up and reads `REGISTER_COMMANDS`. Its commands are built in
a loop from `hf_efficiency.cli.COMMANDS`, the table `hf-efficiency` itself is built from; importing
`hf_efficiency` imports torch and transformers (the plugin registers its quantizer on import), so
this hook is not light.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from hf_efficiency.cli import COMMANDS, Command, run_command


class _HfEfficiencyLeaf(BaseOptimumCLICommand):
    """Runs the `hf_efficiency.cli` command ``SPEC`` on the arguments optimum parsed."""

    SPEC: Command

    def run(self):
        self.args.command = self.SPEC.name
        code = run_command(self.args)
        if code:
            raise SystemExit(code)


def _leaf(command: Command) -> type[_HfEfficiencyLeaf]:
    return type(
        f"{command.name.capitalize()}Command",
        (_HfEfficiencyLeaf,),
        {
            "SPEC": command,
            "COMMAND": CommandInfo(name=command.name, help=command.help),
            "parse_args": staticmethod(command.configure),
        },
    )


class HfEfficiencyCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hf-efficiency", help=f"hf-efficiency: {', '.join(COMMANDS)}")
    SUBCOMMANDS = tuple(CommandInfo(name=c.name, help=c.help, subcommand_class=_leaf(c)) for c in COMMANDS.values())


REGISTER_COMMANDS = [HfEfficiencyCommand]
