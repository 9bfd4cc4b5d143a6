"""``qflux config check FILE`` and ``qflux config show FILE [--set k=v ...]``."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from qflux.config import QfluxConfig, load_config
from qflux.plugins import build_registry

app = typer.Typer(help="Validate or print a config.", no_args_is_help=True)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (value parsed as YAML). Repeatable."


def resolve(path: Path | None, overrides: list[str], trainer: str | None = None) -> QfluxConfig:
    """Load and validate a config, including that its trainer and quantizer are installed and that its
    optimizer and LR scheduler exist."""
    from qflux.training.optim import check_optimizer, check_scheduler

    config = load_config(path, overrides, trainer)
    registry = build_registry()
    registry.trainer(config.trainer)
    if config.model.quantize:
        registry.quantizer(config.model.quantize)
    check_optimizer(config.train)
    check_scheduler(config.train)
    return config


def to_yaml(config: QfluxConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
) -> None:
    """Validate FILE: schema, types, that the trainer / quantizer it names are installed, and that its
    optimizer and LR scheduler exist."""
    config = resolve(file, set_, trainer)
    typer.echo(f"{file}: ok (trainer {config.trainer})")


@app.command("show")
def show(
    file: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    typer.echo(to_yaml(resolve(file, set_, trainer)), nl=False)
