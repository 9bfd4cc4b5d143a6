"""Memory planning: predict a run's peak accelerator memory and host RAM before anything is loaded
(``qflux plan``, and ``qflux train``'s preflight check). ``estimate``: the phases and parts; ``weights``: bytes
from shapes; ``activations``: the measured activation model; ``probe``: the measurement; ``fit``: what fits."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qflux.config.schema import QfluxConfig
    from qflux.plan.estimate import MemoryPlan
    from qflux.plugins import Registry


def plan_memory(config: QfluxConfig, registry: Registry, *, transformer: nn.Module | None = None,
                accelerator: bool | None = None, references: int = 1, world_size: int = 1) -> MemoryPlan:
    """The memory plan of ``config``. ``transformer``: a (meta-device) transformer to plan for instead of the one
    ``model.pretrained`` names; ``accelerator``: plan for one (default: whether this machine has one);
    ``references``: control images per training sample; ``world_size``: processes (``train.fsdp`` shards)."""
    from qflux.plan.estimate import gather, plan

    if accelerator is None:
        import torch

        accelerator = torch.accelerator.is_available()
    inputs = gather(config, registry, transformer, references)
    return plan(config, inputs, accelerator, world_size=world_size)
