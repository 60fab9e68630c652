"""``quantize``'s method options: flags generated from each method's options dataclass.

Every field of a method's ``options`` becomes ``--{method}-{field}`` (``bool`` fields are switches:
``--gptq-act-order``, or ``--no-awq-clip`` for a ``True`` default). Only the flags given on the
command line are collected, into ``quantization={"method": m, m: {field: value, ...}}``; a flag of
another method than ``--method`` is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .common import add_dataclass_arguments

#: extra spellings of generated flags, kept for earlier command lines
ALIASES = {"gptq": {"act_order": ("--act-order",)}}


def methods_table() -> dict[str, Any]:
    """``name -> method`` (``name``, ``summary``, ``calibrated``, ``options`` dataclass): the table of
    `hf_efficiency.quant.methods`."""
    from ..quant.methods import METHODS

    return dict(METHODS)


def method_help(methods: dict[str, Any]) -> str:
    """``--method``'s help: each method's summary, then which ones need calibration data."""
    lines = [f"{name}: {m.summary}" for name, m in methods.items() if m.summary]
    calibrated = [name for name, m in methods.items() if m.calibrated]
    plain = [name for name in methods if name not in calibrated]
    base = f"{' and '.join(plain)} need no data; {' and '.join(calibrated)} run on calibration data (default: rtn)"
    return "; ".join([*lines, base])


def add_method_arguments(p: argparse.ArgumentParser, methods: dict[str, Any]) -> None:
    """One argument group per method with options."""
    for name, method in methods.items():
        if dataclasses.fields(method.options):
            group = p.add_argument_group(f"{name} options (with --method {name})")
            add_dataclass_arguments(
                group, method.options, prefix=f"{name}-", given_only=True, aliases=ALIASES.get(name)
            )


def method_options(args: argparse.Namespace, methods: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization`` keys of the method options given on the command line."""
    given: dict[str, dict[str, Any]] = {}
    for name, method in methods.items():
        for f in dataclasses.fields(method.options):
            value = getattr(args, f"{name}_{f.name}".replace("-", "_"), None)
            if value is not None:
                given.setdefault(name, {})[f.name] = value
    for name, values in given.items():
        if name != args.method:
            flags = ", ".join(_flag(name, field, value) for field, value in values.items())
            raise ValueError(f"{flags}: option(s) of method {name!r}, but --method is {args.method!r}")
    values = given.get(args.method)
    return {args.method: values} if values else {}


def _flag(method: str, field: str, value: Any) -> str:
    name = f"{method}-{field.replace('_', '-')}"
    return f"--no-{name}" if value is False else f"--{name}"
