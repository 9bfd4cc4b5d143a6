"""What every phase of a training run shares: the config, the selected plugin objects, the process group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qflux.config.schema import QfluxConfig
from qflux.model_source import torch_dtype
from qflux.plugins import Registry
from qflux.run.models import Selection
from qflux.training.timesteps import ShiftConstants


@dataclass
class Run:
    config: QfluxConfig
    registry: Registry
    selection: Selection
    accelerator: Any  # accelerate.Accelerator
    console: Console
    fingerprint: str  # training.fingerprint.config_fingerprint of config
    shift: ShiftConstants | None  # the model's resolution-shift constants (timestep_sampling: resolution_shift)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output.dir)

    @property
    def hook(self) -> Any:
        return self.registry.hook

    @property
    def trainer(self) -> Any:
        return self.selection.trainer

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.config.model)

    def unwrap(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(transformer)
