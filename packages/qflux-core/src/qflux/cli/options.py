"""Options every command declares the same way: the config file (``FILE``, ``--config FILE`` or ``-c FILE``) and
path options, whose ``~`` is expanded by the one path rule of the config (``qflux.config.schema.PathStr``).

A shell expands ``~`` only at the start of an unquoted word, so ``--lora "~/x"`` or ``--out=~/x`` would reach
qflux as a literal ``~`` and create a ``./~/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from qflux.errors import UserError

CONFIG_HELP = "YAML config file (also as the first argument: qflux train FILE)."


def expand_path(value: Any) -> Any:
    """Typer callback of every path option: ``~`` expanded in a path or in each path of a list."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(expand_path(v) for v in value)
    return Path(os.path.expanduser(str(value)))


def config_argument() -> Any:
    return typer.Argument(None, help="YAML config file (or --config / -c).", show_default=False,
                          callback=expand_path, metavar="[FILE]")


def config_option(help: str = CONFIG_HELP) -> Any:
    return typer.Option(None, "--config", "-c", help=help, callback=expand_path)


def path_option(*names: str, help: str, default: Any = None) -> Any:
    return typer.Option(default, *names, help=help, callback=expand_path)


def pick_config(file: Path | None, option: Path | None, command: str) -> Path:
    """The config file given as ``FILE`` or ``--config``: exactly one of them (or both the same)."""
    if file is not None and option is not None and file != option:
        raise UserError(f"two config files given ({file} and --config {option}); {command} takes one")
    chosen = file if file is not None else option
    if chosen is None:
        raise UserError(f"no config file given: qflux {command} FILE (or --config FILE)")
    return chosen


class ConfigFirstGroup(TyperGroup):
    """A command group whose own action takes the config too (``qflux cache FILE``): a first argument that is
    no subcommand name is read as ``--config FILE``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["--config", *args]
        return super().parse_args(ctx, args)
