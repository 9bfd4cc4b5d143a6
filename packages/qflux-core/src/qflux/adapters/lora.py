"""The core's own adapter kind, ``lora``: peft LoRA on the transformer's linear layers, exported in
diffusers' format with the strength baked in (``lora_files``), options in ``model.lora``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflux.adapters.base import Adapter
from qflux.config.schema import LoraConfig
from qflux.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig
    from qflux.trainer import Trainer


# model.quantize values (qflux-quant) whose layers peft's DoRA fails on in the first training step (peft 0.21,
# tiny Kontext): fp8 "Promotion for Float8 Types is not supported", int8 (Linear8bitLt) an AttributeError on None
DORA_UNSUPPORTED_QUANTIZE = ("fp8", "int8")


class LoraAdapter(Adapter):
    name = "lora"
    description = ("LoRA (peft; DoRA with model.lora.dora, rsLoRA scaling with model.lora.rslora), exported in "
                   "diffusers format with its scale baked in (loads in diffusers and ComfyUI; a DoRA in diffusers)")
    Options = LoraConfig

    def options_of(self, model: ModelConfig) -> LoraConfig:
        """``model.lora`` (validated with the rest of the config); ``ConfigError`` for DoRA on a base whose weights
        peft cannot read back to compute DoRA's weight norm (qflux-quant's ``fp8`` and ``int8``: a traceback in
        the first step; the 4-bit ``nf4`` / ``fp4`` work)."""
        if model.lora.dora and model.quantize in DORA_UNSUPPORTED_QUANTIZE:
            raise ConfigError(f"model.lora.dora does not work with model.quantize: {model.quantize} (peft's DoRA "
                              "cannot read those weights back); use model.quantize: nf4 or fp4, or null, or set "
                              "model.lora.dora: false")
        return model.lora

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
