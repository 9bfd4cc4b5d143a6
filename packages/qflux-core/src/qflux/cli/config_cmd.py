"""``qflux config check FILE`` and ``qflux config show FILE [--set k=v ...]``."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from qflux.cli.options import config_argument, config_option, pick_config
from qflux.config import QfluxConfig, load_config
from qflux.plugins import build_registry

app = typer.Typer(help="Validate or print a config.", no_args_is_help=True)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (value parsed as YAML). Repeatable."


def check_names(config: QfluxConfig, registry) -> None:
    """The names a config gives exist and take their options (preflight's ``check_plugins``: trainer,
    quantizer, adapter, ``model.options``), then the optimizer and the LR scheduler."""
    from qflux.run.preflight import check_plugins
    from qflux.training.optim import check_optimizer, check_scheduler

    check_plugins(config, registry)
    check_optimizer(config.train)
    check_scheduler(config.train)


def resolve(path: Path | None, overrides: list[str], trainer: str | None = None) -> QfluxConfig:
    """Load and validate a config and run every config-level check of ``qflux train``
    (``qflux.run.preflight.check_config``)."""
    from qflux.run.preflight import check_config

    config = load_config(path, overrides, trainer)
    check_config(config, build_registry())
    return config


def to_yaml(config: QfluxConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


@app.command("check")
def check(
    file: Path | None = config_argument(),
    config_file: Path | None = config_option(),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
) -> None:
    """Validate FILE with every check `qflux train` makes before it reads the data (docs/errors.md): schema,
    types, plugins, optimizer, scheduler, resize mode, model folder, model.lora.targets, validation images."""
    file = pick_config(file, config_file, "config check")
    config = resolve(file, set_, trainer)
    typer.echo(f"{file}: ok (trainer {config.trainer})")


@app.command("show")
def show(
    file: Path | None = config_argument(),
    config_file: Path | None = config_option(),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    file = pick_config(file, config_file, "config show")
    config = load_config(file, set_, trainer)
    check_names(config, build_registry())
    typer.echo(to_yaml(config), nl=False)
