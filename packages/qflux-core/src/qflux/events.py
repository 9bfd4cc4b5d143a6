"""What the run callbacks (``qflux_on_start``, ``qflux_on_step``, ``qflux_on_validation``,
``qflux_on_checkpoint``, ``qflux_on_export``) and the hooks that let a callback take part in the run
(``qflux_eval_weights``, ``qflux_checkpoint_files``) receive: one frozen record per event, so a callback can be
added a field without breaking the plugins that implement it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.adapters.base import Adapter
    from qflux.config.schema import QfluxConfig


@dataclass(frozen=True)
class StartEvent:
    step: int  # optimizer steps done: 0, or the step of the checkpoint resumed from
    checkpoint: Path | None  # the checkpoint folder resumed from (None: a fresh run)
    transformer: torch.nn.Module  # unwrapped, the adapter attached (and the checkpoint's state loaded)
    adapter: Adapter
    params: list[torch.nn.Parameter]  # the adapter's trainable parameters, in the optimizer's order
    config: QfluxConfig
    is_main: bool


@dataclass(frozen=True)
class EvalEvent:
    step: int
    purpose: str  # "validation" (held-out loss, images, the best/ export) or "export" (the final adapter file)
    transformer: torch.nn.Module  # unwrapped, the adapter attached
    adapter: Adapter
    params: list[torch.nn.Parameter]  # holding the trained weights (schedule-free: its evaluation weights)
    config: QfluxConfig
    is_main: bool


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
