"""Optimizer and learning-rate scheduler from the ``train`` config."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Iterable
from typing import TYPE_CHECKING

from qflux.config.schema import TrainConfig
from qflux.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

BUILTIN_OPTIMIZERS = ("adamw", "adamw8bit")
# diffusers.optimization.SchedulerType values (checked against diffusers when a name is not among them)
KNOWN_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "piecewise_constant")


def _hint(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _optimizer_class(name: str) -> type | None:
    """The optimizer class an import path names (None for the builtin names); ``ConfigError`` when the
    name is neither a builtin nor an importable ``torch.optim.Optimizer`` subclass."""
    if name in BUILTIN_OPTIMIZERS:
        return None
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"train.optimizer: unknown optimizer '{name}' (use {', '.join(BUILTIN_OPTIMIZERS)} "
            f"or an import path such as torch.optim.SGD){_hint(name, BUILTIN_OPTIMIZERS)}"
        )
    import torch

    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"train.optimizer: cannot import '{name}' ({err}); install its package or fix the "
                          "import path") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"train.optimizer: '{name}' is not a torch.optim.Optimizer subclass")
    return cls


def check_optimizer(train: TrainConfig) -> None:
    """Fail early (``ConfigError`` naming ``train.optimizer``) for an optimizer that cannot be built, without
    building it: an unknown name, an import path that does not import, ``adamw8bit`` without bitsandbytes."""
    if train.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.optimizer: adamw8bit needs bitsandbytes: pip install bitsandbytes")
        return
    _optimizer_class(train.optimizer)
    if train.optimizer != "adamw" or train.optimizer_args:  # try the arguments on a one-element parameter
        import torch

        build_optimizer([torch.nn.Parameter(torch.zeros(1))], train)


def check_scheduler(train: TrainConfig) -> None:
    """``ConfigError`` naming ``train.scheduler`` when diffusers has no scheduler of that name."""
    if train.scheduler in KNOWN_SCHEDULERS:
        return
    names = _scheduler_names()
    if train.scheduler not in names:
        raise ConfigError(f"train.scheduler: unknown scheduler '{train.scheduler}' (choose from "
                          f"{', '.join(names)}){_hint(train.scheduler, names)}")


def _scheduler_names() -> list[str]:
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    return [t.value for t in TYPE_TO_SCHEDULER_FUNCTION]


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """``adamw`` (torch), ``adamw8bit`` (bitsandbytes) or any optimizer class by import path
    (``torch.optim.SGD``, ``prodigyopt.Prodigy``); ``train.optimizer_args`` are passed through."""
    import torch

    params = list(params)
    kwargs = {"lr": train.lr, **train.optimizer_args}
    name = train.optimizer
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, weight_decay=train.weight_decay, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"train.optimizer_args: adamw rejected the arguments: {err}") from err
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("train.optimizer: adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, weight_decay=train.weight_decay, **kwargs)
    cls = _optimizer_class(name)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.optimizer_args: {name} rejected the arguments: {err}") from err


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """A diffusers scheduler by name (constant, constant_with_warmup, linear, cosine, ...)."""
    from diffusers.optimization import SchedulerType, get_scheduler

    check_scheduler(train)
    name = train.scheduler
    if name == "constant" and train.warmup_steps:
        name = SchedulerType.CONSTANT_WITH_WARMUP.value  # "constant" with warmup means what users expect
    return get_scheduler(name, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=train.max_steps)
