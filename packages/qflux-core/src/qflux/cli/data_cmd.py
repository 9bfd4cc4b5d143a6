"""``qflux data check --config FILE [--set k=v ...]``: report every bad sample before a long run."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qflux.config import load_config

app = typer.Typer(help="Inspect the training data.", no_args_is_help=True)

SET_HELP = "Override a config key, e.g. --set data.path=data/pairs (value parsed as YAML). Repeatable."


def _shown(file: str) -> str:
    """A path under the current directory is shown relative to it."""
    cwd = str(Path.cwd()).rstrip(os.sep) + os.sep
    return file[len(cwd) :] if file.startswith(cwd) else file


def _max_controls(trainer: str) -> int | None:
    """The trainer's control limit when its plugin is installed; None otherwise (data checks need no model)."""
    try:
        from qflux.plugins import build_registry

        return build_registry().trainers[trainer].max_controls
    except Exception:  # noqa: BLE001 - a missing or broken plugin must not stop a data check
        return None


@app.command("check")
def check(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file (its data: section is checked)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
) -> None:
    """Decode every sample of data.path and list each problem (file, reason). Exit 1 when there are any."""
    from qflux.data import inspect_dataset

    cfg = load_config(config, set_, trainer)
    report = inspect_dataset(cfg.data, base_dir=None, max_controls=_max_controls(cfg.trainer))
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: never cut file names
        console = Console(highlight=False, width=1000)
    if report.ok:
        console.print(f"[green]{report.samples} samples ok[/] ({escape(cfg.data.path)})")
        return
    table = Table(title=Text(f"data problems in {cfg.data.path}"))
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    for problem in report.problems:
        table.add_row(Text(_shown(problem.file)), Text(problem.reason))
    console.print(table)
    files = len({p.file for p in report.problems})
    console.print(
        f"[red]{len(report.problems)} problem(s)[/] in {files} file(s); {report.samples} samples found in {escape(cfg.data.path)}"
    )
    raise typer.Exit(1)
