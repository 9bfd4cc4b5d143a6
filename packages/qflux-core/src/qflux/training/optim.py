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

# Optimizers by name whose package is an optional extra: name -> (module, class, pip requirement). A missing
# package is a ConfigError (exit 2) naming the extra, found in preflight before any work (check_optimizer).
EXTRA_OPTIMIZERS = {
    "prodigy": ("prodigyopt", "Prodigy", "qflux-core[optim]"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "qflux-core[optim]"),
}
# The names qflux builds itself (it passes them train.lr and train.weight_decay); anything else is an import path.
BUILTIN_OPTIMIZERS = ("adamw", "adamw8bit", *EXTRA_OPTIMIZERS, "adafactor")
# diffusers.optimization.SchedulerType values (checked against diffusers when a name is not among them)
KNOWN_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "piecewise_constant")


def _hint(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _missing_extra(name: str) -> ConfigError:
    module, _, requirement = EXTRA_OPTIMIZERS[name]
    return ConfigError(f"train.optimizer: {name} needs the package {module}, which is not installed: "
                       f"pip install '{requirement}'")


def _named_class(name: str) -> type:
    """The class of an optimizer qflux knows by name (``prodigy``, ``adamw_schedulefree``, ``adafactor``)."""
    if name == "adafactor":
        import torch

        if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
            return torch.optim.Adafactor
        from transformers.optimization import Adafactor

        return Adafactor
    module, class_name, _ = EXTRA_OPTIMIZERS[name]
    if importlib.util.find_spec(module) is None:
        raise _missing_extra(name)
    return getattr(importlib.import_module(module), class_name)


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
    building it: an unknown name, an import path that does not import, ``adamw8bit`` without bitsandbytes,
    ``prodigy`` / ``adamw_schedulefree`` without their extra (``pip install 'qflux-core[optim]'``)."""
    if train.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.optimizer: adamw8bit needs bitsandbytes: pip install bitsandbytes")
        return
    if train.optimizer in EXTRA_OPTIMIZERS and importlib.util.find_spec(EXTRA_OPTIMIZERS[train.optimizer][0]) is None:
        raise _missing_extra(train.optimizer)
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
    """``adamw`` (torch), ``adamw8bit`` (bitsandbytes), ``prodigy`` (prodigyopt), ``adamw_schedulefree``
    (schedulefree), ``adafactor`` (torch's, else transformers') or any optimizer class by import path
    (``torch.optim.SGD``); ``train.optimizer_args`` are passed through. The named ones get ``train.lr`` and
    ``train.weight_decay``, an import path ``train.lr`` only."""
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
    if name in BUILTIN_OPTIMIZERS:
        cls = _named_class(name)
        kwargs = {"weight_decay": train.weight_decay, **kwargs}
        if cls.__module__.startswith("transformers"):  # its Adafactor computes its own lr unless told not to
            kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
    else:
        cls = _optimizer_class(name)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.optimizer_args: {name} rejected the arguments: {err}") from err


def has_eval_mode(optimizer: object) -> bool:
    """Whether the optimizer keeps its own train / eval weights (schedule-free: ``optimizer.train()`` /
    ``optimizer.eval()``); ``optimizer`` may be accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """A diffusers scheduler by name (constant, constant_with_warmup, linear, cosine, ...)."""
    from diffusers.optimization import SchedulerType, get_scheduler

    check_scheduler(train)
    name = train.scheduler
    if name == "constant" and train.warmup_steps:
        name = SchedulerType.CONSTANT_WITH_WARMUP.value  # "constant" with warmup means what users expect
    return get_scheduler(name, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=train.max_steps)
