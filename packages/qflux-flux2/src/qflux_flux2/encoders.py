"""The typed object ``Trainer.load_encoders`` returns for the FLUX.2 trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qflux.plugin_api import device_of

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKLFlux2, DiffusionPipeline

    from qflux_flux2.variants import Flux2Variant


@dataclass
class Flux2Encoders:
    """Everything besides the transformer that encoding and sampling need; modules frozen, in eval mode.

    ``tokenizer``: a ``PixtralProcessor`` (flux2-dev) or a ``Qwen2TokenizerFast`` (flux2-klein), the
    pipelines' ``tokenizer`` component. ``scheduler_config``: the model's scheduler config; sampling builds a
    fresh ``FlowMatchEulerDiscreteScheduler`` from it for every call. ``source`` names where the encoders came
    from (folder, hub id or ``builtin:tiny``), ``revision`` the hub revision.
    """

    variant: Flux2Variant
    vae: AutoencoderKLFlux2
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str = ""
    revision: str | None = None

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded modules (``Trainer.decoder``'s copy has no text encoder: the VAE only)."""
        return {name: m for name, m in (("vae", self.vae), ("text_encoder", self.text_encoder)) if m is not None}

    @property
    def device(self) -> torch.device:
        return device_of(self.vae)

    def to(self, device: Any) -> Flux2Encoders:
        """Move the VAE and the text encoder to ``device`` (in place); returns self."""
        for module in self.modules.values():
            module.to(device)
        return self

    def pipeline(self, transformer: Any = None, scheduler: Any = None) -> DiffusionPipeline:
        """The variant's pipeline (``Flux2Pipeline`` / ``Flux2KleinPipeline``) sharing these modules (nothing is
        copied), for its helpers (prompt encoding, VAE normalisation, patchify, ids) or for sampling with
        ``transformer``. ``scheduler``: a fresh one from ``scheduler_config`` when None."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        return getattr(diffusers, self.variant.pipeline_class_name)(
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            transformer=transformer,
        )
