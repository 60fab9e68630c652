"""`optimum-cli hf-efficiency ...`: optimum's CLI plugin hook (PEP 420 namespace, no __init__.py).

optimum imports this file at CLI start-up and reads `REGISTER_COMMANDS`. It reuses the argument
definitions of `hf-efficiency`'s own CLI; importing `hf_efficiency` imports torch and transformers
(the plugin registers its quantizer on import), so this hook is not light.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from hf_efficiency import cli


class _HfEfficiencyLeaf(BaseOptimumCLICommand):
    NAME = ""

    def run(self):
        self.args.command = self.NAME
        code = cli.run_command(self.args)
        if code:
            raise SystemExit(code)


class QuantizeCommand(_HfEfficiencyLeaf):
    NAME = "quantize"
    COMMAND = CommandInfo(name="quantize", help=cli.QUANTIZE_HELP)

    @staticmethod
    def parse_args(parser):
        parser.description = cli.QUANTIZE_DESCRIPTION
        cli.add_quantize_arguments(parser)


class ConvertCommand(_HfEfficiencyLeaf):
    NAME = "convert"
    COMMAND = CommandInfo(name="convert", help=cli.CONVERT_HELP)

    @staticmethod
    def parse_args(parser):
        parser.description = cli.CONVERT_DESCRIPTION
        cli.add_convert_arguments(parser)


class EvalCommand(_HfEfficiencyLeaf):
    NAME = "eval"
    COMMAND = CommandInfo(name="eval", help=cli.EVAL_HELP)

    @staticmethod
    def parse_args(parser):
        parser.description = cli.EVAL_DESCRIPTION
        cli.add_eval_arguments(parser)


class EstimateCommand(_HfEfficiencyLeaf):
    NAME = "estimate"
    COMMAND = CommandInfo(name="estimate", help=cli.ESTIMATE_HELP)

    @staticmethod
    def parse_args(parser):
        parser.description = cli.ESTIMATE_DESCRIPTION
        cli.add_estimate_arguments(parser)


class DistillCommand(_HfEfficiencyLeaf):
    NAME = "distill"
    COMMAND = CommandInfo(name="distill", help=cli.DISTILL_HELP)

    @staticmethod
    def parse_args(parser):
        cli.add_distill_arguments(parser)


class GenerateCommand(_HfEfficiencyLeaf):
    NAME = "generate"
    COMMAND = CommandInfo(name="generate", help=cli.GENERATE_HELP)

    @staticmethod
    def parse_args(parser):
        cli.add_generate_arguments(parser)


class HfEfficiencyCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="hf-efficiency",
        help="hf-efficiency: quantize, convert community formats, evaluate, estimate memory, "
        "distill, speculative generate",
    )
    SUBCOMMANDS = (
        CommandInfo(name="quantize", help=cli.QUANTIZE_HELP, subcommand_class=QuantizeCommand),
        CommandInfo(name="convert", help=cli.CONVERT_HELP, subcommand_class=ConvertCommand),
        CommandInfo(name="eval", help=cli.EVAL_HELP, subcommand_class=EvalCommand),
        CommandInfo(name="estimate", help=cli.ESTIMATE_HELP, subcommand_class=EstimateCommand),
        CommandInfo(name="distill", help=cli.DISTILL_HELP, subcommand_class=DistillCommand),
        CommandInfo(name="generate", help=cli.GENERATE_HELP, subcommand_class=GenerateCommand),
    )


REGISTER_COMMANDS = [HfEfficiencyCommand]
