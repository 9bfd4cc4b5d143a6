"""The core's own hook implementations, registered before any plugin: the default loss and the ``lora``,
``lokr`` and ``loha`` adapters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qflux.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.adapters.base import Adapter
    from qflux.config.schema import LossConfig
    from qflux.types import Batch, NoisyInput


@hookimpl
def qflux_register_adapters(register: Callable[[Adapter], None]) -> None:
    from qflux.adapters.lora import LoraAdapter
    from qflux.adapters.lycoris import LohaAdapter, LokrAdapter

    register(LoraAdapter())
    register(LokrAdapter())
    register(LohaAdapter())


@hookimpl(trylast=True)
def qflux_loss(prediction: torch.Tensor, noisy: NoisyInput, batch: Batch, loss: LossConfig) -> torch.Tensor:
    from qflux.loss import flow_matching_loss

    weights = loss.mask_weighting
    return flow_matching_loss(prediction, noisy.target, batch.mask, weights.foreground, weights.background,
                              batch.masked)
