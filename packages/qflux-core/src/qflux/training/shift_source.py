"""Where a run's resolution-shift constants come from: the model's own scheduler config, read once per run.

FLUX.1 Kontext's scheduler says 0.5 -> 1.15 over 256 -> 4096 tokens, Qwen-Image's 0.5 -> 0.9 over 256 -> 8192:
one hard-coded set would give the other model a much noisier training distribution (at 1 MP Qwen would see
shift 3.16 instead of its own 2.0). Order of the sources:

1. the trainer's ``Trainer.scheduler_config`` (it knows ``builtin:tiny`` and reads hub ids with
   ``model.revision``);
2. a diffusers folder's ``scheduler/scheduler_config.json`` (a trainer that does not implement it);
3. diffusers' ``FlowMatchEulerDiscreteScheduler`` defaults, said aloud, since they are FLUX's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qflux.config.schema import ModelConfig
from qflux.errors import UserError
from qflux.trainer import Trainer
from qflux.training.timesteps import ShiftConstants


@dataclass(frozen=True)
class ModelShift:
    constants: ShiftConstants
    source: str  # where they came from, for the start-up line

    def describe(self) -> str:
        c = self.constants
        return (f"timestep shift from {self.source}: mu {c.base_shift} at {c.base_image_seq_len} tokens to "
                f"{c.max_shift} at {c.max_image_seq_len} ({c.time_shift_type})")


def folder_scheduler_config(pretrained: str) -> dict[str, Any] | None:
    """``scheduler/scheduler_config.json`` of a diffusers folder (``~`` expanded), or None when there is none."""
    file = Path(pretrained).expanduser() / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{pretrained}': {file} is not valid JSON: {err}") from err


def model_shift(trainer: Trainer, model: ModelConfig) -> ModelShift:
    """The resolution-shift constants of ``model`` (see the module docstring for the order of sources)."""
    config = trainer.scheduler_config(model)
    source = f"the {trainer.name} plugin's scheduler config"
    if config is None:
        config = folder_scheduler_config(model.pretrained)
        source = f"{model.pretrained}/scheduler/scheduler_config.json"
    if config is None:
        return ModelShift(ShiftConstants(), f"diffusers' FlowMatchEulerDiscreteScheduler defaults (FLUX's; no "
                                            f"scheduler config known for trainer '{trainer.name}')")
    try:
        return ModelShift(ShiftConstants.from_scheduler_config(config), source)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: {err}") from err
