"""The typed object ``Trainer.load_encoders`` returns for the ``kontext`` trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qflux.plugin_api import device_of

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


@dataclass
class KontextEncoders:
    """Everything besides the transformer that encoding and sampling need; modules frozen, in eval mode.

    ``scheduler_config`` is the model's scheduler config: sampling builds a fresh
    ``FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)`` for every call. ``max_sequence_length``
    is the model's default T5 length (512 for FLUX.1 Kontext, 32 for ``builtin:tiny``); the config key
    ``model.max_sequence_length`` overrides it. ``source`` names where the encoders came from.
    """

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    text_encoder_2: T5EncoderModel
    tokenizer_2: T5TokenizerFast
    scheduler_config: dict[str, Any]
    max_sequence_length: int = 512
    source: str = ""

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded modules (``Trainer.decoder``'s copy has no text encoders: the VAE only)."""
        found = {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in found.items() if module is not None}

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return device_of(self.vae)

    def to(self, device: Any) -> KontextEncoders:
        """Move the three modules to ``device`` (in place); returns self."""
        for module in self.modules.values():
            module.to(device)
        return self
