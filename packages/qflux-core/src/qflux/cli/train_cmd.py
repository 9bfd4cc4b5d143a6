"""``qflux train FILE|--config FILE [--trainer NAME] [--set k=v ...] [--resume | --resume-from CKPT]``.

Before anything is written, ``qflux.run.preflight.check_run`` checks every mistake it can find without a
model (config, plugins, model folder, output and cache folders, resume checkpoint, every data sample). One
run per ``output.dir``: the main process then takes its lock (``qflux.run.lock``, a second run is refused
with exit 2) and holds it from before ``--cache`` encoding to the end. Nothing but the lock file is written
to ``output.dir`` before the models loaded, and the cache folder is created with its first entry, so a run
that fails earlier leaves nothing behind (the lock removes the file, and the folder if it created it).
"""

from __future__ import annotations

from pathlib import Path

import typer

from qflux.cli.config_cmd import SET_HELP
from qflux.cli.data_cmd import ALLOW_NO_CONTROLS_HELP, ALLOW_NO_CONTROLS_SET
from qflux.cli.options import config_argument, config_option, path_option, pick_config
from qflux.config import load_config
from qflux.errors import UserError


def train(
    file: Path | None = config_argument(),
    config: Path | None = config_option(),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest valid checkpoint in output.dir."),
    resume_from: Path | None = path_option("--resume-from", help="Continue from this checkpoint folder."),
    cache: bool = typer.Option(False, "--cache", help="Fill the embedding cache first (encoders then freed)."),
    allow_no_controls: bool = typer.Option(False, "--allow-no-controls", help=ALLOW_NO_CONTROLS_HELP),
) -> None:
    """Train a LoRA as configured; writes the LoRA, checkpoints, samples and logs under output.dir."""
    from qflux.plugins import build_registry
    from qflux.run.preflight import check_run

    if resume and resume_from is not None:
        raise UserError("use either --resume or --resume-from, not both")
    if resume_from is not None and not resume_from.is_dir():
        raise UserError(f"--resume-from: checkpoint folder not found: {resume_from}")
    set_ = [*set_, ALLOW_NO_CONTROLS_SET] if allow_no_controls else set_
    cfg = load_config(pick_config(file, config, "train"), set_, trainer)
    if cache and not cfg.cache.enabled:
        raise UserError("--cache needs cache.enabled: true (or drop --cache)")
    registry = build_registry()
    how = resume_from if resume_from is not None else resume
    records = check_run(cfg, registry, resume=how)  # checked once, then handed on (no second scan or hash)

    from qflux.run.lock import RunLock, main_process
    from qflux.run.train import train as run_training

    # taken here, before --cache encodes anything; train() takes it again (counted) and the main process
    # holds it until the run ends
    with RunLock(cfg.output.dir, enabled=main_process()):
        if cache:
            from qflux.run.cache import build_cache

            build_cache(cfg, registry, records=records)
        run_training(cfg, registry=registry, resume=how, records=records)
