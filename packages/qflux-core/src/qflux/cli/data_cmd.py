"""``qflux data check --config FILE [--set k=v ...]``: report every bad sample before a long run."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qflux.cli.options import config_argument, config_option, pick_config
from qflux.config import load_config

app = typer.Typer(help="Inspect the training data.", no_args_is_help=True)

SET_HELP = "Override a config key, e.g. --set data.path=data/pairs (value parsed as YAML). Repeatable."


def _shown(file: str) -> str:
    """A path under the current directory is shown relative to it."""
    cwd = str(Path.cwd()).rstrip(os.sep) + os.sep
    return file[len(cwd) :] if file.startswith(cwd) else file


# ``--allow-no-controls`` on ``qflux data check`` and ``qflux train``: the same as this --set (config.yaml records it)
ALLOW_NO_CONTROLS_SET = "data.allow_no_controls=true"
ALLOW_NO_CONTROLS_HELP = ("Train an edit trainer on a dataset without any control image (text-to-image) with a "
                          "warning instead of refusing it; the same as --set data.allow_no_controls=true.")


def _trainer_needs(trainer: str) -> tuple[int | None, bool]:
    """``(max_controls, needs_controls)`` of the trainer when its plugin is installed; otherwise no control limit,
    and controls needed (every qflux trainer edits images; data checks need no model)."""
    try:
        from qflux.plugins import build_registry

        info = build_registry().trainers[trainer].info
        return info.max_controls, info.needs_controls
    except Exception:  # noqa: BLE001 - a missing or broken plugin must not stop a data check
        return None, True


def _print_report(console: Console, report) -> None:  # noqa: ANN001 - qflux.data.DataReport (imported lazily)
    """The facts of the report, its warnings and what was skipped (with the reason)."""
    console.print(f"[bold]{escape(report.source)}[/]")
    for line in report.lines():
        console.print(f"  {line.label:<10} {escape(line.text)}")
        for detail in line.details:
            console.print(f"{'':13}- {escape(_shown(detail))}")
    for warning in report.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(_shown(str(warning)))}")


@app.command("check")
def check(
    file: Path | None = config_argument(),
    config: Path | None = config_option("YAML config file (its data: section is checked; or FILE)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    allow_no_controls: bool = typer.Option(False, "--allow-no-controls", help=ALLOW_NO_CONTROLS_HELP),
) -> None:
    """Decode every sample of data.path; print what it holds (samples, controls, masks, planned sizes, held-out
    samples, what is not read and why) and list each problem (file, reason). Exit 1 when there are any."""
    from qflux.data import inspect_dataset
    from qflux.plugins import build_registry
    from qflux.run.preflight import check_config

    set_ = [*set_, ALLOW_NO_CONTROLS_SET] if allow_no_controls else set_
    cfg = load_config(pick_config(file, config, "data check"), set_, trainer)
    check_config(cfg, build_registry(), need_plugins=False)  # what train refuses before reading data, refused here
    max_controls, needs_controls = _trainer_needs(cfg.trainer)
    report = inspect_dataset(cfg.data, base_dir=None, max_controls=max_controls, needs_controls=needs_controls)
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: never cut file names
        console = Console(highlight=False, width=1000)
    _print_report(console, report)
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
