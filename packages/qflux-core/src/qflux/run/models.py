"""One builder for the models of a run and of ``qflux sample``: load the transformer, quantize it, attach the
adapter (training) or apply an adapter file (inference), and the encoders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflux.adapters.base import Adapter
from qflux.config.schema import QfluxConfig
from qflux.plugins import Registry
from qflux.quantizer import Quantizer
from qflux.trainer import Trainer
from qflux.types import ModelBundle

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Selection:
    """The registered objects a config selects: ``trainer``, ``model.quantize``, ``model.adapter``."""

    trainer: Trainer
    quantizer: Quantizer | None
    adapter: Adapter

    @classmethod
    def of(cls, config: QfluxConfig, registry: Registry) -> Selection:
        quantize = config.model.quantize
        return cls(registry.trainer(config.trainer), registry.quantizer(quantize) if quantize else None,
                   registry.adapter(config.model.adapter))

    def adapter_options(self, config: QfluxConfig) -> Any:
        return self.adapter.options_of(config.model)


def load_base(selection: Selection, config: QfluxConfig) -> torch.nn.Module:
    """The frozen transformer, quantized when ``model.quantize`` is set."""
    transformer = selection.trainer.load_transformer(config.model)
    if selection.quantizer is not None:
        transformer = selection.quantizer.quantize(transformer, config.model)
    return transformer


@dataclass
class TrainingModels:
    transformer: torch.nn.Module  # the adapter attached
    params: list[torch.nn.Parameter]  # the adapter's trainable parameters


def training_models(selection: Selection, config: QfluxConfig) -> TrainingModels:
    """The base (quantized), gradient checkpointing when asked, the adapter attached.

    ``train.fsdp`` over several processes on a local diffusers folder: the base is sharded as it is read, each
    process reading only its rows (``qflux.training.sharded_load``); ``builtin:tiny`` and hub ids load whole
    here and are sharded later (``qflux.training.strategy``)."""
    if config.train.fsdp:
        from qflux.training.sharded_load import load_sharded, sharded_world

        found = sharded_world(config)
        if found is not None:
            transformer, params, _ = load_sharded(selection, config, found[1])
            return TrainingModels(transformer, params)
    transformer = load_base(selection, config)
    if config.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = selection.adapter.attach(transformer, selection.adapter_options(config))
    offload(transformer, config)
    return TrainingModels(transformer, params)


def offload(transformer: torch.nn.Module, config: QfluxConfig) -> None:
    """``model.offload_blocks``: after the adapter is attached (its parameters stay on the device) and after
    gradient checkpointing is on (the recomputation fetches through the same hooks)."""
    if config.model.offload_blocks:
        from qflux.training.offload import apply_offload

        apply_offload(transformer, config.model)


def inference_bundle(selection: Selection, config: QfluxConfig, adapter_file: Path | None) -> ModelBundle:
    """What ``Trainer.sample`` needs: the base (quantized) with ``adapter_file`` applied, and the encoders."""
    transformer = load_base(selection, config)
    if adapter_file is not None:
        selection.adapter.load_file(transformer, adapter_file)
    offload(transformer, config)
    encoders = selection.trainer.load_encoders(config.model)
    return ModelBundle(trainer=selection.trainer, model=config.model, transformer=transformer, encoders=encoders)
