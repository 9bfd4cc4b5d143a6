"""``qflux cache --config FILE`` (build, then stop) and ``qflux cache info|verify|prune --config FILE``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from qflux.cli.config_cmd import SET_HELP
from qflux.config import load_config

app = typer.Typer(help="Build or inspect the embedding cache.", invoke_without_command=True)

CONFIG_HELP = "YAML config file (its data, model and cache sections define the entries)."


@app.callback()
def build(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Encode the config's dataset into the embedding cache, then stop."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    from qflux.cache.build import build_cache
    from qflux.config.preflight import check_cache_run
    from qflux.plugins import build_registry

    cfg = load_config(config, set_, trainer)
    registry = build_registry()
    check_cache_run(cfg, registry)  # nothing is written for a config or dataset with mistakes
    report = build_cache(cfg, registry)
    rate = report.encoded / report.seconds if report.seconds > 0 and report.encoded else 0.0
    typer.echo(f"{report.samples} samples: {report.encoded} encoded ({rate:.1f} samples/s), "
               f"{report.samples - report.encoded} already cached -> {cfg.cache.dir}")


def _open(config: Path, set_: list[str], trainer: str | None):
    from qflux.cache.build import open_cache
    from qflux.plugins import build_registry

    cfg = load_config(config, set_, trainer)
    cache, context = open_cache(cfg, build_registry(), Console(stderr=True, soft_wrap=True))
    return cfg, cache, context


@app.command("info")
def info(config: Path = typer.Option(..., "--config", help=CONFIG_HELP),
         trainer: str | None = typer.Option(None, "--trainer"),
         set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Entries, size on disk, and how many of the config's samples are cached."""
    from qflux.cache.keys import entry_key
    from qflux.data import open_records

    cfg, cache, context = _open(config, set_, trainer)
    keys = {entry_key(context, r.fingerprint()) for r in open_records(cfg.data)}
    cached = sum(1 for k in keys if k in cache)
    typer.echo(f"{cache.root}: {len(cache)} entries, {cache.total_bytes() / 2**20:.1f} MiB; "
               f"this config: {cached}/{len(keys)} samples cached")


@app.command("verify")
def verify(config: Path = typer.Option(..., "--config", help=CONFIG_HELP),
           trainer: str | None = typer.Option(None, "--trainer"),
           set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Check every entry's size, sha256 and format; exit 1 when any is bad (they re-encode on next use)."""
    _, cache, _ = _open(config, set_, trainer)
    problems = cache.verify()
    for p in problems:
        typer.echo(f"{p.path}: {p.reason}")
    typer.echo(f"{len(cache) - len(problems)}/{len(cache)} entries ok")
    if problems:
        raise typer.Exit(1)


@app.command("prune")
def prune(config: Path = typer.Option(..., "--config", help=CONFIG_HELP),
          trainer: str | None = typer.Option(None, "--trainer"),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Delete entries that the config's current samples and settings no longer use."""
    from qflux.cache.keys import entry_key
    from qflux.data import open_records

    cfg, cache, context = _open(config, set_, trainer)
    removed = cache.prune(entry_key(context, r.fingerprint()) for r in open_records(cfg.data))
    typer.echo(f"removed {removed} entries, {len(cache)} left")
