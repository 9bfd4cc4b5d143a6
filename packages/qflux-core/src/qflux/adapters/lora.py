"""The core's own adapter kind, ``lora``: peft LoRA on the transformer's linear layers, exported in
diffusers' format with the strength baked in (``lora_files``), options in ``model.lora``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflux.adapters.base import Adapter
from qflux.config.schema import LoraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig
    from qflux.trainer import Trainer


class LoraAdapter(Adapter):
    name = "lora"
    description = "LoRA (peft), exported in diffusers format with alpha/rank baked in (loads in diffusers and ComfyUI)"
    Options = LoraConfig

    def options_of(self, model: ModelConfig) -> LoraConfig:
        return model.lora  # validated with the rest of the config (``model.lora``)

    def attach(self, transformer: torch.nn.Module, options: Any) -> list[torch.nn.Parameter]:
        from qflux.adapters.lora_files import attach_lora

        return attach_lora(transformer, options)

    def state_dict(self, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        from qflux.adapters.lora_files import lora_state_dict

        return lora_state_dict(transformer)

    def load_state(self, transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from qflux.adapters.lora_files import load_lora_state

        load_lora_state(transformer, state)

    def checkpoint_metadata(self, options: Any) -> dict[str, str]:
        from qflux.adapters.lora_files import checkpoint_lora_metadata

        return checkpoint_lora_metadata(options)

    def export(self, transformer: torch.nn.Module, trainer: Trainer, options: Any, directory: Path,
               extra_metadata: dict[str, str] | None = None) -> Path:
        from qflux.adapters.lora_files import export_lora

        return export_lora(transformer, trainer.info.pipeline, options, directory, extra_metadata=extra_metadata)

    def load_file(self, transformer: torch.nn.Module, path: Path) -> None:
        from qflux.adapters.lora_files import load_lora_file

        load_lora_file(transformer, path)
