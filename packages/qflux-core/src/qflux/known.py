"""The plugin names the qflux project publishes (``known_plugins.json``), as data: an unknown trainer or
quantizer name can then say which package to install, and a dated alias (``qwen-edit-2509``) is read as its
trainer's name before any plugin is loaded. The core's code names no trainer."""

from __future__ import annotations

import importlib.resources
import json

_KNOWN = json.loads(importlib.resources.files("qflux").joinpath("known_plugins.json").read_text(encoding="utf-8"))
KNOWN_TRAINERS: dict[str, str] = _KNOWN["trainers"]  # trainer name -> the package that provides it
# Other names users know a model by -> the trainer's name. The config keeps the trainer's name (config.yaml,
# cache keys, checkpoints), so an alias and its trainer are interchangeable.
TRAINER_ALIASES: dict[str, str] = _KNOWN["trainer_aliases"]
KNOWN_QUANTIZERS: dict[str, str] = _KNOWN["quantizers"]


def canonical_trainer(name: str) -> str:
    """The trainer's own name for ``name`` (an alias such as ``qwen-edit-2509``), else ``name`` unchanged."""
    return TRAINER_ALIASES.get(name, name)


def aliases_of(trainer: str) -> list[str]:
    return sorted(alias for alias, target in TRAINER_ALIASES.items() if target == trainer)
