"""The transformer forward of one training step, as the pipelines' denoising loop calls it.

``Flux2Transformer2DModel(hidden_states=cat([noisy target, *clean references], dim=1), encoder_hidden_states=prompt,
timestep=sigma, img_ids=..., txt_ids=..., guidance=...)``:

- timestep: the pipelines pass ``t / 1000`` with ``t = sigma * 1000``, i.e. sigma (the model scales it back).
- ``img_ids``: 4-axis ``(t, h, w, l)`` RoPE positions, the pipelines' own helpers: ``_prepare_latent_ids`` for
  the target (t = 0) then ``_prepare_image_ids`` for the references (reference i at t = 10 + 10 i). The model
  reads one set of ids per batch (``img_ids[0]``), so a batch shares one layout: the core runs a batch of mixed
  reference layouts as sub-batches of one layout (``Batch.layout_groups``).
- ``txt_ids``: ``_prepare_text_ids`` (t = h = w = 0, l = token index).
- guidance: flux2-dev embeds a guidance value (``model.options.guidance``, 1.0 by default); klein passes None.
- output: the first N tokens (the target's); the reference tokens are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qflux.plugin_api import compute_dtype
from qflux_flux2.variants import Flux2Variant

if TYPE_CHECKING:  # pragma: no cover
    from qflux.plugin_api import Batch, Grid, NoisyInput


def image_ids(grid: Grid, control_grids: list[Grid]) -> torch.Tensor:
    """[N + sum Nc_i, 4] positions of the target's then the references' tokens (the pipelines' helpers)."""
    from diffusers import Flux2Pipeline

    ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 0, *grid))[0]
    if not control_grids:
        return ids
    refs = Flux2Pipeline._prepare_image_ids([torch.empty(1, 0, *g) for g in control_grids])[0]
    return torch.cat([ids, refs], dim=0)


def text_ids(prompt: torch.Tensor) -> torch.Tensor:
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_text_ids(prompt)


def input_dtype(transformer: torch.nn.Module, device_type: str = "cpu") -> torch.dtype | None:
    """The dtype inputs are cast to (None under autocast, which casts by itself): the model's compute dtype."""
    return None if torch.is_autocast_enabled(device_type) else compute_dtype(transformer)


def forward(transformer: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, prompt: torch.Tensor,
            controls: list[torch.Tensor], grid: Grid, control_grids: list[Grid],
            guidance: float | None) -> torch.Tensor:
    """Velocity for the target tokens [B, N, C] (the denoising loop's transformer call)."""
    device = latents.device
    dtype = input_dtype(transformer, device.type)
    hidden = torch.cat([latents, *[c.to(device, latents.dtype) for c in controls]], dim=1)
    if dtype is not None:
        hidden, prompt, sigmas = hidden.to(dtype), prompt.to(dtype), sigmas.to(dtype)
    batch = latents.shape[0]
    ids = image_ids(grid, control_grids).to(device).unsqueeze(0).expand(batch, -1, -1)
    embedded = None if guidance is None else torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
    out = transformer(
        hidden_states=hidden,
        encoder_hidden_states=prompt,
        timestep=sigmas,
        img_ids=ids,
        txt_ids=text_ids(prompt).to(device),
        guidance=embedded,
        return_dict=False,
    )[0]
    return out[:, : latents.shape[1]]


def predict(variant: Flux2Variant, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
            guidance: float) -> torch.Tensor:
    """``Trainer.predict``: the predicted velocity of the target tokens, [B, N, C]."""
    sigmas = noisy.sigmas.reshape(-1).to(noisy.latents.device)
    if sigmas.numel() == 1 and noisy.latents.shape[0] > 1:
        sigmas = sigmas.expand(noisy.latents.shape[0])
    return forward(transformer, noisy.latents, sigmas, batch.prompt.hidden, batch.controls, batch.grid,
                   batch.control_grids, guidance if variant.guidance_embeds else None)
