"""The ``Adapter`` a plugin registers: how one kind of adapter attaches to a transformer, what of it is
trained, saved, resumed and exported, and how a file of it is loaded for inference.

The core never looks inside an adapter's tensors: checkpoints hold exactly ``state_dict``, resume feeds it to
``load_state``, the final file is whatever ``export`` writes. So a kind whose parameters are not named like
LoRA's (peft's LoKr ``lokr_w1``...) is saved in full, never silently dropped.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydantic import BaseModel

    from qflux.config.schema import ModelConfig
    from qflux.trainer import Trainer


# The safetensors header entry both a checkpoint's adapter file and the export carry: the digest of the
# adapter's state (``state_digest``), so a run folder can tell the export is of a checkpoint's weights even
# when the export holds them in another form (training.run_folder.exported_from).
STATE_DIGEST = "qflux.adapter_state_sha256"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``state`` (what ``Adapter.state_dict`` returns)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Adapter(ABC):
    """Base class of registered adapter kinds. ``name`` is the value of ``model.adapter``; ``Options`` the
    pydantic model of its keys (``model.adapter_options``; the core's ``lora`` keeps ``model.lora``),
    validated in preflight with the same "did you mean" errors as the core's keys. The methods without a
    body are abstract: a kind that lacks one cannot be registered (its plugin is listed as broken)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]]
    file_name: ClassVar[str] = "pytorch_lora_weights.safetensors"  # what ``export`` writes into the run folder

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def options_of(self, model: ModelConfig) -> BaseModel:
        """This adapter's options: ``model.adapter_options`` validated by ``Options``."""
        return self.Options.model_validate(model.adapter_options)

    def check(self, options: Any, transformer_module_names: list[str] | None) -> None:  # noqa: B027 - optional
        """Refuse (raise ``UserError``) options that cannot work; ``transformer_module_names``: the names of
        the transformer's modules when known without loading weights (built on the meta device), else None.
        Called by preflight."""

    @abstractmethod
    def attach(self, transformer: torch.nn.Module, options: Any) -> list[torch.nn.Parameter]:
        """Wrap the frozen ``transformer`` in place; return the trainable parameters, in a stable order."""
        raise NotImplementedError

    @abstractmethod
    def state_dict(self, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable tensor of the adapter, on CPU, under stable names: what a checkpoint holds."""
        raise NotImplementedError

    @abstractmethod
    def load_state(self, transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put ``state`` (from ``state_dict``) back into an attached transformer, exactly."""
        raise NotImplementedError

    def checkpoint_metadata(self, options: Any) -> dict[str, str]:
        """Safetensors header entries of a checkpoint's adapter file (what a loader needs to read it)."""
        return {}

    @abstractmethod
    def export(self, transformer: torch.nn.Module, trainer: Trainer, options: Any, directory: Path,
               extra_metadata: dict[str, str] | None = None) -> Path:
        """Write the adapter for use outside qflux (diffusers, ComfyUI) into ``directory``, atomically;
        returns the file."""
        raise NotImplementedError

    @abstractmethod
    def load_file(self, transformer: torch.nn.Module, path: Path) -> None:
        """Apply an exported file (or a checkpoint's adapter file) to a bare transformer for inference;
        raise ``UserError`` naming the file when it does not fit."""
        raise NotImplementedError
