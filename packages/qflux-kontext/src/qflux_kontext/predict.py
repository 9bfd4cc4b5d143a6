"""The Kontext transformer forward, as ``FluxKontextPipeline``'s denoising loop calls it.

``hidden_states = cat([target tokens, control_1, control_2, ...], dim=1)``; ``img_ids`` from
``packing.kontext_image_ids`` (target index 0, control i index i + 1), ``txt_ids`` zeros [L, 3];
``timestep = sigma`` (the pipeline passes ``t / 1000``, which is sigma); ``guidance = full([B], guidance)``
when the transformer has a guidance embedding (Kontext-dev does). The output is sliced to the target tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from qflux.plugin_api import unwrap
from qflux_kontext.packing import kontext_image_ids, text_ids

if TYPE_CHECKING:  # pragma: no cover
    from qflux.plugin_api import Batch, Grid, NoisyInput


def transformer_config(transformer: torch.nn.Module) -> Any:
    """The diffusers config of a transformer that may be wrapped (peft, DDP / FSDP, torch.compile)."""
    config = getattr(unwrap(transformer), "config", None)
    if config is None or not hasattr(config, "guidance_embeds"):
        raise TypeError(f"{type(transformer).__name__} is not a FluxTransformer2DModel (no config.guidance_embeds)")
    return config


def forward(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_hidden: torch.Tensor,
    pooled: torch.Tensor,
    grid: Grid,
    controls: list[torch.Tensor] = (),  # type: ignore[assignment]
    control_grids: list[Grid] = (),  # type: ignore[assignment]
    guidance: float = 1.0,
) -> torch.Tensor:
    """Velocity for the target tokens [B, N, C] of ``latents`` [B, N, C] at ``timestep`` [B] (= sigma)."""
    n = latents.shape[1]
    device = latents.device
    hidden = torch.cat([latents, *[c.to(device=device, dtype=latents.dtype) for c in controls]], dim=1)
    guidance_vec = None
    if transformer_config(transformer).guidance_embeds:
        guidance_vec = torch.full([latents.shape[0]], guidance, device=device, dtype=torch.float32)
    out = transformer(
        hidden_states=hidden,
        timestep=timestep,
        guidance=guidance_vec,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_hidden,
        txt_ids=text_ids(prompt_hidden.shape[1], device=device),
        img_ids=kontext_image_ids(grid, list(control_grids), device=device),
        return_dict=False,
    )[0]
    return out[:, :n]


def predict(transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput, guidance: float) -> torch.Tensor:
    """``Trainer.predict``: the training-step forward on ``noisy.latents`` at ``noisy.sigmas``; ``guidance``: the
    guidance embedding (``model.options.guidance``)."""
    return forward(
        transformer,
        noisy.latents,
        noisy.sigmas.to(noisy.latents.dtype),
        batch.prompt.hidden,
        batch.prompt.pooled,
        batch.grid,
        batch.controls,
        batch.control_grids,
        guidance,
    )
