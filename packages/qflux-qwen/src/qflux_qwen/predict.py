"""The transformer forward of one training step, as the pipelines' denoising loop calls it.

``QwenImageTransformer2DModel(hidden_states=cat([noisy target, *clean controls], dim=1),
encoder_hidden_states=prompt, encoder_hidden_states_mask=mask, timestep=sigma, img_shapes=..., guidance=None)``:

- timestep: the pipelines pass ``t / 1000`` with ``t = sigma * num_train_timesteps``, i.e. sigma itself.
- ``img_shapes``: per batch item ``[(1, h, w) of the target, (1, h_i, w_i) of each control]`` in tokens (the
  transformer's 3-D RoPE gives the target frame index 0 and control i frame index i, and with ``zero_cond_t``
  it modulates the control tokens with the embedding of t = 0).
- the prompt mask: diffusers 0.42 derives the text length from ``encoder_hidden_states_mask`` (there is no
  ``txt_seq_lens``). Right-padded prompts keep their RoPE positions (text positions start after the largest
  image extent whatever the padding) and padded keys are masked out of the joint attention, so a sample's
  prediction does not depend on the other prompts of its batch. A mask of ones is passed as None, as the
  pipelines' ``encode_prompt`` does.
- output: the first N tokens (the target's); the control tokens are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qflux.plugin_api import compute_dtype, unwrap
from qflux_qwen.variants import QwenVariant

if TYPE_CHECKING:  # pragma: no cover
    from qflux.plugin_api import Batch, Grid, NoisyInput


def img_shapes(grid: Grid, control_grids: list[Grid], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` of the transformer: per batch item the target's then each control's (1, h, w)."""
    shapes = [(1, *grid), *[(1, *g) for g in control_grids]]
    return [list(shapes) for _ in range(batch_size)]


def input_dtype(transformer: torch.nn.Module, device_type: str = "cpu") -> torch.dtype | None:
    """The dtype inputs are cast to (None under autocast, which casts by itself): the model's compute dtype."""
    return None if torch.is_autocast_enabled(device_type) else compute_dtype(transformer)


def prompt_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or bool(mask.all()):
        return None
    return mask


def check_zero_cond_t(variant: QwenVariant, transformer: torch.nn.Module) -> None:
    if variant.zero_cond_t and not getattr(unwrap(transformer), "zero_cond_t", False):
        raise RuntimeError(
            f"the {variant.name} trainer needs a transformer with zero_cond_t=True (condition tokens at t=0); "
            "load it through Trainer.load_transformer or call qflux_qwen.loading.enable_zero_cond_t on it"
        )


def forward(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    controls: list[torch.Tensor],
    grid: Grid,
    control_grids: list[Grid],
) -> torch.Tensor:
    """Velocity for the target tokens [B, N, C] (the denoising loop's transformer call)."""
    dtype = input_dtype(transformer, latents.device.type)
    hidden = torch.cat([latents, *[c.to(latents.device, latents.dtype) for c in controls]], dim=1)
    if dtype is not None:
        hidden, prompt, sigmas = hidden.to(dtype), prompt.to(dtype), sigmas.to(dtype)
    out = transformer(
        hidden_states=hidden,
        encoder_hidden_states=prompt,
        encoder_hidden_states_mask=prompt_mask(mask),
        timestep=sigmas,
        img_shapes=img_shapes(grid, control_grids, latents.shape[0]),
        guidance=None,
        return_dict=False,
    )[0]
    return out[:, : latents.shape[1]]


def predict(variant: QwenVariant, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput) -> torch.Tensor:
    """``Trainer.predict``: the predicted velocity of the target tokens, [B, N, C]."""
    check_zero_cond_t(variant, transformer)
    sigmas = noisy.sigmas.reshape(-1).to(noisy.latents.device)
    if sigmas.numel() == 1 and noisy.latents.shape[0] > 1:
        sigmas = sigmas.expand(noisy.latents.shape[0])
    return forward(
        transformer,
        noisy.latents,
        sigmas,
        batch.prompt.hidden,
        batch.prompt.mask,
        batch.controls,
        batch.grid,
        batch.control_grids,
    )
