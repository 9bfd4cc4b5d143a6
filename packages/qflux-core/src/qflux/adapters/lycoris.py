"""The core's LyCORIS adapter kinds, ``lokr`` and ``loha``: peft's LoKr / LoHa on the transformer's linear layers,
options in ``model.adapter_options``, exported in LyCORIS key naming (``lycoris_files``) that ComfyUI loads.

Light at import (pydantic only): ``qflux plugins list`` imports it; torch and peft load when a method runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from qflux.adapters.base import Adapter
from qflux.config.schema import Section
from qflux.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig
    from qflux.trainer import Trainer

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class _LycorisOptions(Section):
    rank: int = Field(16, ge=1)  # peft ``r``: the rank of each decomposed factor
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))  # Linear names (peft's suffix rule)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # per output row of the update, in training
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # the whole update of a module skipped, in training


class LokrOptions(_LycorisOptions):
    """``model.adapter_options`` of ``model.adapter: lokr`` (peft ``LoKrConfig``)."""

    # the Kronecker split of each side: -1 = two factors near its square root (LyCORIS' default); n: one factor n
    decompose_factor: int = -1
    decompose_both: bool = False  # also decompose the left (small) factor w1 into w1_a @ w1_b when rank allows
    rank_dropout_scale: bool = False  # rescale the rows rank_dropout keeps
    init: Literal["default", "lycoris"] = "default"  # default: w1 starts at zero; lycoris: w2 does (LyCORIS' way)

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"-1 (split near the square root) or a factor >= 1, not {v}")
        return v


class LohaOptions(_LycorisOptions):
    """``model.adapter_options`` of ``model.adapter: loha`` (peft ``LoHaConfig``)."""


class _LycorisAdapter(Adapter):
    """peft's LoKr / LoHa through ``lycoris_files``; ``name`` picks the kind."""

    Options: ClassVar[type[_LycorisOptions]]

    def options_of(self, model: ModelConfig) -> _LycorisOptions:
        """``model.adapter_options`` validated; ``ConfigError`` with ``model.quantize`` (peft's LoKr / LoHa wrap
        full-precision Linear layers only, and ``qflux sample`` merges into full-precision weights)."""
        if model.quantize:
            raise ConfigError(f"model.adapter: {self.name} needs a full-precision transformer, but model.quantize is "
                              f"{model.quantize}: set model.quantize: null, or use model.adapter: lora")
        return self.Options.model_validate(model.adapter_options)

    def check(self, options: Any, transformer_module_names: list[str] | None) -> None:
        from qflux.adapters.lycoris_files import check_targets

        check_targets(options, transformer_module_names)

    def attach(self, transformer: torch.nn.Module, options: Any) -> list[torch.nn.Parameter]:
        from qflux.adapters.lycoris_files import attach

        return attach(transformer, self.name, options)

    def state_dict(self, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        from qflux.adapters.lycoris_files import state_dict

        return state_dict(transformer, self.name)

    def load_state(self, transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from qflux.adapters.lycoris_files import load_state

        load_state(transformer, self.name, state)

    def checkpoint_metadata(self, options: Any) -> dict[str, str]:
        from qflux.adapters.lycoris_files import checkpoint_metadata

        return checkpoint_metadata(self.name, options)

    def export(self, transformer: torch.nn.Module, trainer: Trainer, options: Any, directory: Path,
               extra_metadata: dict[str, str] | None = None) -> Path:
        from qflux.adapters.lycoris_files import export

        return export(transformer, self.name, options, directory / self.file_name, extra_metadata)

    def load_file(self, transformer: torch.nn.Module, path: Path) -> None:
        from qflux.adapters.lycoris_files import merge_file

        merge_file(transformer, self.name, path)


class LokrAdapter(_LycorisAdapter):
    name = "lokr"
    description = ("LoKr (peft, Kronecker product), exported in LyCORIS key naming (lokr_w1, lokr_w2, alpha) "
                   "that ComfyUI loads")
    Options = LokrOptions
    file_name = "lokr_weights.safetensors"


class LohaAdapter(_LycorisAdapter):
    name = "loha"
    description = ("LoHa (peft, Hadamard product), exported in LyCORIS key naming (hada_w1_a ... hada_w2_b, alpha) "
                   "that ComfyUI loads")
    Options = LohaOptions
    file_name = "loha_weights.safetensors"
