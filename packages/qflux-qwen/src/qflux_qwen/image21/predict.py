"""The transformer forward of one ``qwen-image-2.1`` training step, as the pipeline's denoising loop calls it.

``QwenImage21Transformer2DModel(hidden_states=cat([*clean conditions, noisy target], dim=1), timestep=sigma,
encoder_hidden_states=prompt, encoder_hidden_states_mask=mask, img_shapes=..., img_mask=...)``:

- conditions come first and the target last (the pipeline's order); the output's last N tokens are the target's;
- timestep: the pipeline passes ``t / 1000`` with ``t = sigma * 1000``, i.e. sigma;
- ``img_shapes``: per batch item ``[(1, h_i, w_i) of each condition, (1, h, w) of the target]``;
- ``img_mask``: the prompt's image slots followed by one slot per 2 x 2 target tokens (``append_target_slots``);
  the model reads the layout from row 0, so a batch shares one condition layout (the core groups by layout) and
  right-padded prompts keep their slots where they are (the images come before the text);
- the prompt mask: None when no prompt of the batch is padded, as the pipeline's ``encode_prompt`` returns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qflux.plugin_api import compute_dtype

if TYPE_CHECKING:  # pragma: no cover
    from qflux.plugin_api import Batch, Grid, NoisyInput


def img_mask(slots: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """[B, L + N/4] bool: the prompt's image slots, then the target's slots (2 x 2 tokens each)."""
    return torch.cat([slots.bool(), slots.new_ones(slots.shape[0], target_tokens // 4, dtype=torch.bool)], dim=1)


def forward(transformer: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, prompt: torch.Tensor,
            mask: torch.Tensor | None, slots: torch.Tensor, controls: list[torch.Tensor], grid: Grid,
            control_grids: list[Grid]) -> torch.Tensor:
    """Velocity for the target tokens [B, N, C] (the denoising loop's transformer call)."""
    dtype = None if torch.is_autocast_enabled(latents.device.type) else compute_dtype(transformer)
    hidden = torch.cat([*[c.to(latents.device, latents.dtype) for c in controls], latents], dim=1)
    if dtype is not None:
        hidden, prompt, sigmas = hidden.to(dtype), prompt.to(dtype), sigmas.to(dtype)
    shapes = [[*[(1, *g) for g in control_grids], (1, *grid)] for _ in range(latents.shape[0])]
    out = transformer(
        hidden_states=hidden,
        timestep=sigmas,
        encoder_hidden_states=prompt,
        encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask,
        img_shapes=shapes,
        img_mask=img_mask(slots.to(latents.device), latents.shape[1]),
        return_dict=False,
    )[0]
    return out[:, -latents.shape[1]:]


def predict(transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput) -> torch.Tensor:
    """``Trainer.predict``: the predicted velocity of the target tokens, [B, N, C]."""
    if batch.prompt.image_slots is None:
        raise RuntimeError("qwen-image-2.1: the batch's prompt has no image_slots (an embedding-cache entry from "
                           "another trainer?); re-encode with this trainer")
    sigmas = noisy.sigmas.reshape(-1).to(noisy.latents.device)
    if sigmas.numel() == 1 and noisy.latents.shape[0] > 1:
        sigmas = sigmas.expand(noisy.latents.shape[0])
    return forward(transformer, noisy.latents, sigmas, batch.prompt.hidden, batch.prompt.mask,
                   batch.prompt.image_slots, batch.controls, batch.grid, batch.control_grids)
