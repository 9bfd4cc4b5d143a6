"""``qflux cache FILE`` (build, then stop) and ``qflux cache info|verify|prune FILE`` (FILE or ``--config``/``-c``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from qflux.cli.config_cmd import SET_HELP
from qflux.cli.options import ConfigFirstGroup, config_argument, config_option, pick_config
from qflux.config import load_config

app = typer.Typer(help="Build or inspect the embedding cache.", invoke_without_command=True, cls=ConfigFirstGroup)

CONFIG_HELP = "YAML config file (its data, model and cache sections define the entries; or FILE)."


@app.callback()
def build(
    ctx: typer.Context,
    config: Path | None = config_option(CONFIG_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Encode the config's dataset into the embedding cache, then stop (qflux cache FILE)."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    from qflux.plugins import build_registry
    from qflux.run.cache import build_cache
    from qflux.run.preflight import check_cache_run

    cfg = load_config(config, set_, trainer)
    registry = build_registry()
    records = check_cache_run(cfg, registry)  # nothing is written for a config or dataset with mistakes
    report = build_cache(cfg, registry, records=records)
    rate = report.encoded / report.seconds if report.seconds > 0 and report.encoded else 0.0
    typer.echo(f"{report.samples} samples: {report.encoded} encoded ({rate:.1f} samples/s), "
               f"{report.samples - report.encoded} already cached -> {cfg.cache.dir}")


def _open(file: Path | None, config: Path | None, command: str, set_: list[str], trainer: str | None):
    from qflux.plugins import build_registry
    from qflux.run.cache import open_cache

    cfg = load_config(pick_config(file, config, f"cache {command}"), set_, trainer)
    cache, context = open_cache(cfg, build_registry(), Console(stderr=True, soft_wrap=True))
    return cfg, cache, context


@app.command("info")
def info(file: Path | None = config_argument(),
         config: Path | None = config_option(CONFIG_HELP),
         trainer: str | None = typer.Option(None, "--trainer"),
         set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Entries, size on disk, and how many of the config's samples are cached."""
    from qflux.cache.keys import entry_key
    from qflux.data import open_records

    cfg, cache, context = _open(file, config, "info", set_, trainer)
    keys = {entry_key(context, r.fingerprint()) for r in open_records(cfg.data)}
    cached = sum(1 for k in keys if k in cache)
    typer.echo(f"{cache.root}: {len(cache)} entries, {cache.total_bytes() / 2**20:.1f} MiB; "
               f"this config: {cached}/{len(keys)} samples cached")


@app.command("verify")
def verify(file: Path | None = config_argument(),
           config: Path | None = config_option(CONFIG_HELP),
           trainer: str | None = typer.Option(None, "--trainer"),
           set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Check every entry's size, sha256 and format; exit 1 when any is bad (they re-encode on next use)."""
    _, cache, _ = _open(file, config, "verify", set_, trainer)
    problems = cache.verify()
    for p in problems:
        typer.echo(f"{p.path}: {p.reason}")
    typer.echo(f"{len(cache) - len(problems)}/{len(cache)} entries ok")
    if problems:
        raise typer.Exit(1)


@app.command("prune")
def prune(file: Path | None = config_argument(),
          config: Path | None = config_option(CONFIG_HELP),
          trainer: str | None = typer.Option(None, "--trainer"),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          yes: bool = typer.Option(False, "--yes", "-y", help="Delete them (without it: only list what would go)."),
          all_trainers: bool = typer.Option(False, "--all-trainers",
                                            help="Also delete unused entries of other trainers sharing cache.dir.")) -> None:
    """List (or with --yes delete) the entries the config's current samples and settings no longer use.

    A dry run unless --yes: a shared cache.dir holds entries another config still needs, which this config
    cannot tell apart from stale ones. Entries written by another trainer are kept unless --all-trainers."""
    from qflux.cache.keys import entry_key
    from qflux.data import open_records

    cfg, cache, context = _open(file, config, "prune", set_, trainer)
    keep = [entry_key(context, r.fingerprint()) for r in open_records(cfg.data)]
    plan = cache.plan_prune(keep, None if all_trainers else cfg.trainer)
    kept = "; ".join(f"{n} of trainer {who}" for who, n in plan.kept_other.items())
    if kept:
        typer.echo(f"kept (not this trainer's: --all-trainers to include them): {kept}")
    if not plan.remove:
        typer.echo(f"removed 0 entries, {len(cache)} left (nothing to prune)")
        return
    what = f"{len(plan.remove)} entries ({plan.bytes / 2**20:.1f} MiB) of {cache.root}"
    if not yes:
        for key in plan.remove[:20]:
            typer.echo(f"  {cache.path_of(key)} (trainer {cache.owner_of(key)})")
        more = f"  ... and {len(plan.remove) - 20} more\n" if len(plan.remove) > 20 else ""
        typer.echo(f"{more}would remove {what}, unused by this config; nothing deleted: add --yes to delete them")
        return
    removed = cache.prune(keep, None if all_trainers else cfg.trainer)
    typer.echo(f"removed {removed} entries, {len(cache)} left")
