"""``qflux train --config FILE [--trainer NAME] [--set k=v ...] [--resume | --resume-from CKPT]``.

Before anything is written, ``qflux.config.preflight.check_run`` checks every mistake it can find without a
model (config, plugins, model folder, output and cache folders, resume checkpoint, every data sample). A user
error found later (while loading the model, say) removes what this command created and holds nothing of value
(``CleanupOnUserError``), so a failed run leaves no half-created ``output.dir`` behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from qflux.cli.config_cmd import SET_HELP
from qflux.config import load_config
from qflux.errors import UserError

# What the training loop writes before its first step; a run folder holding only these has nothing of value.
_STARTUP_FILES = ("config.yaml", "metrics.jsonl", "loss.png")
_STARTUP_DIRS = ("tensorboard", "checkpoints", "samples")


class CleanupOnUserError:
    """On a ``UserError``, remove ``output.dir`` / ``cache.dir`` when this command created them and they hold
    nothing of value (no checkpoint, LoRA, sample grid, logged training step or cache entry)."""

    def __init__(self, output_dir: Path | None, cache_dir: Path | None) -> None:
        roles = [("cache", cache_dir), ("run", output_dir)]  # the cache first: it may sit inside output.dir
        self.created = [(role, p, self._first_missing(p)) for role, p in roles if p is not None]
        self.created = [(role, p, first) for role, p, first in self.created if first is not None]

    @staticmethod
    def _first_missing(path: Path) -> Path | None:
        """The outermost folder of ``path`` that does not exist yet (None: ``path`` exists)."""
        path = path.absolute()
        if path.exists():
            return None
        while not path.parent.exists():
            path = path.parent
        return path

    def __enter__(self) -> CleanupOnUserError:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None or not issubclass(kind, UserError):
            return
        if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the main process cleans up
            return
        for role, path, first in self.created:
            (self._clean_cache if role == "cache" else self._clean_run)(path)
            self._remove_empty(path, first)

    @staticmethod
    def _clean_run(path: Path) -> None:
        if not path.is_dir():
            return
        if (path / "pytorch_lora_weights.safetensors").exists():
            return
        if any((path / d).is_dir() and any((path / d).iterdir()) for d in ("checkpoints", "samples")):
            return
        metrics = path / "metrics.jsonl"
        if metrics.is_file() and '"loss"' in metrics.read_text(encoding="utf-8", errors="replace"):
            return
        if any(p.name not in _STARTUP_FILES + _STARTUP_DIRS for p in path.iterdir()):
            return
        for name in _STARTUP_FILES:
            (path / name).unlink(missing_ok=True)
        for name in _STARTUP_DIRS:
            folder = path / name
            if folder.is_dir():
                for file in folder.iterdir():
                    if name == "tensorboard" and file.is_file() and file.name.startswith("events.out.tfevents"):
                        file.unlink()

    @staticmethod
    def _clean_cache(path: Path) -> None:
        index = path / "index.jsonl"
        if index.is_file() and index.stat().st_size:
            return  # complete entries are kept: the next run reuses them
        index.unlink(missing_ok=True)

    @staticmethod
    def _remove_empty(path: Path, first: Path) -> None:
        """Remove empty folders from ``path`` (and its empty subfolders) up to ``first``."""
        if path.is_dir():
            for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
        node = path.absolute()
        while True:
            try:
                node.rmdir()
            except OSError:
                return
            if node == first:
                return
            node = node.parent


def train(
    config: Path = typer.Option(..., "--config", help="YAML config file."),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest valid checkpoint in output.dir."),
    resume_from: Path | None = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    cache: bool = typer.Option(False, "--cache", help="Fill the embedding cache first (encoders then freed)."),
) -> None:
    """Train a LoRA as configured; writes the LoRA, checkpoints, samples and logs under output.dir."""
    from qflux.config.preflight import check_run
    from qflux.plugins import build_registry

    if resume and resume_from is not None:
        raise UserError("use either --resume or --resume-from, not both")
    if resume_from is not None and not resume_from.is_dir():
        raise UserError(f"--resume-from: checkpoint folder not found: {resume_from}")
    cfg = load_config(config, set_, trainer)
    if cache and not cfg.cache.enabled:
        raise UserError("--cache needs cache.enabled: true (or drop --cache)")
    registry = build_registry()
    how = resume_from if resume_from is not None else resume
    check_run(cfg, registry, resume=how)

    from qflux.training.loop import train as run_training

    with CleanupOnUserError(Path(cfg.output.dir), Path(cfg.cache.dir) if cfg.cache.enabled else None):
        if cache:
            from qflux.cache.build import build_cache

            build_cache(cfg, registry)
        run_training(cfg, registry=registry, resume=how)
