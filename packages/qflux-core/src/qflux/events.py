"""What the run callbacks (``qflux_on_step``, ``qflux_on_validation``, ``qflux_on_checkpoint``,
``qflux_on_export``) receive: one frozen record per event, so a callback can be added a field without
breaking the plugins that implement it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.adapters.base import Adapter
    from qflux.config.schema import QfluxConfig


@dataclass(frozen=True)
class StepEvent:
    step: int  # optimizer steps done
    loss: float  # mean loss of this step's micro-batches
    lr: float
    transformer: torch.nn.Module  # unwrapped (no DDP wrapper), the adapter attached
    adapter: Adapter
    params: list[torch.nn.Parameter]  # the adapter's trainable parameters
    config: QfluxConfig
    is_main: bool


@dataclass(frozen=True)
class ValidationEvent:
    step: int
    val_loss: float | None  # None without held-out samples
    config: QfluxConfig
    is_main: bool
    fidelity: dict[str, float] = field(default_factory=dict)  # the main process's fidelity means


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: Path | None  # None on processes that do not write
    config: QfluxConfig
    is_main: bool


@dataclass(frozen=True)
class ExportEvent:
    step: int
    path: Path | None  # None on processes that do not write
    config: QfluxConfig
    is_main: bool
    extra: dict[str, Any] = field(default_factory=dict)
