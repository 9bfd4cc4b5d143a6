"""``model.lora.targets`` checked before any data is encoded: against the transformer built on the meta device.

The transformer's module names come from its class and config alone, so the check reads no weights and
allocates no memory: the class and config of a folder (``model_index.json``, else the trainer's pipeline;
``transformer/config.json``), or the trainer plugin's tiny builder (``<plugin package>.tiny.tiny_transformer``)
for ``builtin:tiny``. Importing a diffusers pipeline costs seconds: only the model class is imported. A hub id is not contacted here (its config may be in
the local hub cache or not): the loop checks the targets again once the model is loaded.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflux.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover

    from qflux.config.schema import QfluxConfig
    from qflux.trainer import Trainer


def check_lora_targets(config: QfluxConfig, trainer: Trainer) -> None:
    """``ConfigError`` naming each target the transformer has no module for (with did-you-mean). Only targets
    the config sets are checked here (a typo is the user's; importing diffusers costs seconds): the default
    ones are checked when the model loads."""
    if "targets" not in config.model.lora.model_fields_set:
        return
    transformer = meta_transformer(config, trainer)
    if transformer is None:
        return
    from qflux.adapters.lora_files import missing_targets, targets_message

    missing = missing_targets(list(config.model.lora.targets), [n for n, _ in transformer.named_modules()])
    if missing:
        raise ConfigError(targets_message(missing, transformer))


def meta_transformer(config: QfluxConfig, trainer: Trainer) -> Any | None:
    """The trainer's transformer on the meta device, or None when its class or config is not known offline."""
    import torch

    from qflux.model_source import ModelSource

    source = ModelSource.of(config.model)
    try:
        if source.is_tiny:
            build = _tiny_builder(trainer)
            if build is None:
                return None
            with torch.device("meta"):
                return build()
        if source.path is None or not source.path.is_dir():
            return None
        cls, kwargs = _folder_transformer(source.path, trainer)
        if cls is None or kwargs is None:
            return None
        with torch.device("meta"):
            return cls.from_config(kwargs)
    except Exception:  # noqa: BLE001 - a model this check cannot build: the loader reports it with context
        return None


def _pipeline_transformer_class(pipeline: str) -> type | None:
    module, _, name = pipeline.rpartition(".")
    try:
        types = getattr(importlib.import_module(module), name)._get_signature_types()
    except Exception:  # noqa: BLE001 - a pipeline that cannot be inspected: no check
        return None
    return next((c for c in types.get("transformer", ()) if isinstance(c, type)), None)


def _tiny_builder(trainer: Trainer) -> Callable[[], Any] | None:
    """``tiny_transformer`` of the ``tiny`` module next to the module that defines the trainer's class (called
    with the trainer's name when it takes one: one plugin, several trainers)."""
    import functools
    import inspect

    package = type(trainer).__module__.rpartition(".")[0]
    try:
        build = getattr(importlib.import_module(f"{package}.tiny"), "tiny_transformer", None)
    except ImportError:
        return None
    if not callable(build):
        return None
    return functools.partial(build, trainer.name) if inspect.signature(build).parameters else build


def _folder_transformer(folder: Path, trainer: Trainer) -> tuple[type | None, dict[str, Any] | None]:
    cls = None
    try:
        entry = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("transformer")
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers":
            cls = getattr(importlib.import_module("diffusers"), str(entry[1]), None)
    except (OSError, ValueError, AttributeError):
        cls = None
    cls = cls or _pipeline_transformer_class(trainer.info.pipeline)
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return cls, None
    return cls, config if isinstance(config, dict) else None
