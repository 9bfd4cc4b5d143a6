"""The typed object ``Trainer.load_encoders`` returns for the Qwen trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qflux.plugin_api import device_of

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKLQwenImage, DiffusionPipeline
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor


@dataclass
class QwenEncoders:
    """Everything besides the transformer that encoding and sampling need; modules frozen, in eval mode.

    ``scheduler_config`` is the model's scheduler config: sampling builds a fresh
    ``FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)`` for every call. ``source`` names where the
    encoders came from (folder, hub id or ``builtin:tiny``), ``revision`` the hub revision.
    """

    vae: AutoencoderKLQwenImage
    text_encoder: Qwen2_5_VLForConditionalGeneration
    tokenizer: Qwen2Tokenizer
    processor: Qwen2VLProcessor
    scheduler_config: dict[str, Any]
    source: str = ""
    revision: str | None = None

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded modules (``Trainer.decoder``'s copy has no text encoder: the VAE only)."""
        return {name: m for name, m in (("vae", self.vae), ("text_encoder", self.text_encoder)) if m is not None}

    @property
    def vae_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def device(self) -> torch.device:
        return device_of(self.vae)

    def to(self, device: Any) -> QwenEncoders:
        """Move the VAE and the text encoder to ``device`` (in place); returns self."""
        for module in self.modules.values():
            module.to(device)
        return self

    def pipeline(self, class_name: str, transformer: Any = None, scheduler: Any = None) -> DiffusionPipeline:
        """A diffusers pipeline of ``class_name`` (``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``)
        sharing these modules (nothing is copied), for its helpers (prompt template, VAE normalisation,
        packing) or for sampling with ``transformer``. ``scheduler``: a fresh one from ``scheduler_config``."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        return getattr(diffusers, class_name)(
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            processor=self.processor,
            transformer=transformer,
        )
