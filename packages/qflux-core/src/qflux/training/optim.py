"""Optimizer and learning-rate scheduler from the ``train`` config."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

from qflux.config.schema import TrainConfig
from qflux.errors import ConfigError

BUILTIN_OPTIMIZERS = ("adamw", "adamw8bit")


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """``adamw`` (torch), ``adamw8bit`` (bitsandbytes) or any optimizer class by import path
    (``torch.optim.SGD``, ``prodigyopt.Prodigy``); ``train.optimizer_args`` are passed through."""
    params = list(params)
    kwargs = {"lr": train.lr, **train.optimizer_args}
    name = train.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, weight_decay=train.weight_decay, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("train.optimizer: adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, weight_decay=train.weight_decay, **kwargs)
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"train.optimizer: unknown optimizer '{name}' (use {', '.join(BUILTIN_OPTIMIZERS)} "
            "or an import path such as torch.optim.SGD)"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"train.optimizer: cannot import '{name}' ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"train.optimizer: '{name}' is not a torch.optim.Optimizer subclass")
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise ConfigError(f"train.optimizer_args: {name} rejected the arguments: {err}") from err


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """A diffusers scheduler by name (constant, constant_with_warmup, linear, cosine, ...)."""
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType, get_scheduler

    names = [t.value for t in TYPE_TO_SCHEDULER_FUNCTION]
    if train.scheduler not in names:
        raise ConfigError(f"train.scheduler: unknown scheduler '{train.scheduler}' (choose from {', '.join(names)})")
    name = train.scheduler
    if name == "constant" and train.warmup_steps:
        name = SchedulerType.CONSTANT_WITH_WARMUP.value  # "constant" with warmup means what users expect
    return get_scheduler(name, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=train.max_steps)
