"""The settings a resume may change, and making the restored optimizer and LR scheduler follow them.

Lowering the learning rate and continuing is common, so a resume **applies** the changed ``train`` and
``loss`` settings (``train.lr``, ``weight_decay``, ``scheduler``, ``warmup_steps``, ``max_grad_norm``,
``max_steps``, ...) and says which, old -> new; ``config.yaml`` then records what runs, and ``metrics.jsonl``
the step each change took effect. What the checkpoint's state was built for cannot change: the keys of the
config fingerprint (model, data, batch, seed, optimizer, timestep sampling; ``training.fingerprint``) and
``train.optimizer_args`` (an optimizer state of other arguments may lack the tensors the new ones need).

Restoring the optimizer and scheduler state dicts would bring back the old hyper-parameters with them
(``param_groups`` carry lr and weight_decay, the scheduler its ``base_lrs``): the values the new config built
are put back on top (``apply_hyperparameters``). Unchanged settings give the same values bit for bit, so an
unchanged resume stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError
from qflux.training.optim import BUILTIN_OPTIMIZERS

# train keys the fingerprint already refuses (named by qflux.run.preflight), and one it cannot see
FINGERPRINTED = frozenset({"batch_size", "grad_accum", "seed", "optimizer", "timestep_sampling"})
FIXED = frozenset({"optimizer_args"})
REPORTED_SECTIONS = ("train", "loss")


@dataclass(frozen=True)
class Change:
    """One setting that differs from the run that wrote the checkpoint."""

    key: str  # dotted, e.g. "train.lr"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value and prefix.count(".") < 1:  # sections, not dict-valued settings
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def previous_settings(checkpoint: Path) -> dict[str, Any]:
    """``key -> value`` of the ``train`` and ``loss`` settings of the run that wrote ``checkpoint``, from its
    ``config.yaml`` when that is the config of that run (same fingerprint); empty when unknown."""
    import json

    import yaml

    from qflux.training import checkpoint as ckpt
    from qflux.training.fingerprint import config_fingerprint

    try:
        written_with = json.loads((checkpoint / ckpt.STATE).read_text(encoding="utf-8"))["config_fingerprint"]
        old = QfluxConfig.model_validate(yaml.safe_load(
            (checkpoint.parent.parent / "config.yaml").read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - no readable record: only what the optimizer state tells
        return {}
    if config_fingerprint(old) != written_with:
        return {}
    dumped = old.model_dump(mode="json")
    return {k: v for section in REPORTED_SECTIONS for k, v in _flat(dumped[section], section).items()}


def optimizer_settings(optimizer_state: dict, scheduler_state: dict, optimizer: str) -> dict[str, Any]:
    """``train.lr`` and ``train.weight_decay`` as the checkpoint's optimizer ran them (what ran, whatever a
    ``config.yaml`` says); weight_decay only for the builtin optimizers, the ones qflux passes it to."""
    found: dict[str, Any] = {}
    groups = optimizer_state.get("param_groups") or []
    base_lrs = scheduler_state.get("base_lrs") or [g.get("initial_lr") for g in groups]
    if base_lrs and base_lrs[0] is not None:
        found["train.lr"] = float(base_lrs[0])
    if optimizer in BUILTIN_OPTIMIZERS and groups and "weight_decay" in groups[0]:
        found["train.weight_decay"] = float(groups[0]["weight_decay"])
    return found


def settings_changes(old: dict[str, Any], config: QfluxConfig) -> list[Change]:
    """The settings of ``old`` (see ``previous_settings``) that ``config`` changes, fingerprinted keys left out
    (the fingerprint refuses those)."""
    dumped = config.model_dump(mode="json")
    new = {k: v for section in REPORTED_SECTIONS for k, v in _flat(dumped[section], section).items()}
    skip = {f"train.{k}" for k in FINGERPRINTED}
    return [Change(k, old[k], new.get(k)) for k in sorted(old) if k not in skip and old[k] != new.get(k)]


def refuse_fixed(changes: list[Change], checkpoint: Path) -> None:
    """``ConfigError`` naming the changed settings a resume cannot apply."""
    fixed = [c for c in changes if c.key.removeprefix("train.") in FIXED]
    if fixed:
        raise ConfigError(f"--resume: {', '.join(str(c) for c in fixed)} cannot change on resume (the optimizer "
                          f"state of {checkpoint} was built with the old arguments); resume with the old value, or "
                          "start a new output.dir")


def describe_changes(changes: list[Change], step: int) -> str:
    return f"resuming at step {step} with changed settings (applied from here on): " + \
        ", ".join(str(c) for c in changes)


# The param-group entries the config sets (train.lr through the LR scheduler, train.weight_decay). The others
# stay the checkpoint's: they are either fixed by train.optimizer_args (refused when changed) or state that
# some optimizers keep in their param groups (Prodigy's d, d_max, k; schedule-free's k, weight_sum, lr_max,
# train_mode), which a fresh optimizer would reset.
CONFIG_ENTRIES = ("lr", "initial_lr", "weight_decay")


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of each param group as the new config built them (call after building the LR
    scheduler, which adds ``initial_lr``, and before loading the checkpoint's state)."""
    return [{k: group[k] for k in CONFIG_ENTRIES if k in group} for group in optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, lr_scheduler, fresh: list[dict[str, Any]]) -> None:
    """After ``load_state_dict`` of the optimizer and the LR scheduler: their hyper-parameters back to the
    values of the new config (``fresh``, from ``hyperparameters``), the LR to the new schedule at the restored
    step. The per-parameter state (Adam moments) and the step count stay those of the checkpoint."""
    for group, values in zip(optimizer.param_groups, fresh, strict=True):
        group.update(values)
    lr_scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # diffusers' schedulers are LambdaLR; their lambdas are closures, never restored: the new config's
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs


def resume_changes(checkpoint: Path, optimizer_state: dict, scheduler_state: dict,
                   config: QfluxConfig) -> list[Change]:
    """The settings ``config`` changes from the run that wrote ``checkpoint`` (its ``config.yaml``, with lr
    and weight_decay as its optimizer ran them); ``ConfigError`` for those a resume cannot apply."""
    old = {**previous_settings(checkpoint),
           **optimizer_settings(optimizer_state, scheduler_state, config.train.optimizer)}
    changes = settings_changes(old, config)
    refuse_fixed(changes, checkpoint)
    return changes
