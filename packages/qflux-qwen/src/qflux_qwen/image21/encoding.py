"""``Trainer.encode`` for ``qwen-image-2.1``: VAE latents, the Qwen3-VL prompt with its image slots, edit masks.

What one ``EncodedSample`` holds (tensors on CPU, float32):

- ``latents`` [N, 64]: the target, as RGBA (an opaque image gets alpha 255, as the pipeline's ``convert("RGBA")``
  gives it), through ``AutoencoderKLQwenImage21`` (latent mode), normalised ``(z - mean) / std`` and flattened,
  unpatched: the pipeline's ``_encode_vae_image`` and ``_pack_latents``; ``grid`` = (H/16, W/16).
- ``controls`` / ``control_grids``: every condition image the same way, at the size the data stage gave it (by
  default the pipeline's ``calculate_dimensions(1024 ** 2, aspect)``, sides multiples of 32).
- ``prompt``: ``PromptEmbeds(hidden [L, D], mask=None, image_slots [L])``: the pipeline's
  ``_get_qwen_prompt_embeds`` over its template, with the condition images in their vision slots ("<image1>
  <|vision_start|><|image_pad|>..." before the text): the last decoder layer's states before the final norm, the
  system prefix dropped. ``image_slots`` marks the VL image-token positions the transformer fills with the
  conditions' latents. No condition: the text-to-image template.
- ``empty_prompt``: the same for ``""`` (with the same conditions) when caption dropout is on; reference dropout
  gets every subset's prompt from the core (``TrainerInfo.prompt_sees_controls``).
- ``mask`` [N]: ``EditSample.mask`` pooled to 16 x 16 pixel tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qflux.plugin_api import EncodedSample, PromptEmbeds, UserError, device_of, mask_to_tokens
from qflux_qwen.image21.info import MAX_CONDITIONS, SIDE_MULTIPLE

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import EditSample, Grid, ModelConfig
    from qflux_qwen.image21.loading import Image21Encoders


def check_side(image: Image, what: str, key: str) -> None:
    if image.width % SIDE_MULTIPLE or image.height % SIDE_MULTIPLE:
        raise UserError(
            f"sample '{key}': {what} is {image.width}x{image.height}; Qwen-Image 2.1 needs sides that are multiples "
            f"of {SIDE_MULTIPLE} (one vision slot covers 2 x 2 tokens of 16 px): give data.resolution as [h, w] or "
            f"buckets with sides multiple of {SIDE_MULTIPLE}, or a square budget such as 1024"
        )


def check_sample(sample: EditSample) -> None:
    if sample.target is None:
        raise UserError(f"sample '{sample.key}' has no target image; training samples need one")
    if len(sample.controls) > MAX_CONDITIONS:
        raise UserError(f"sample '{sample.key}' has {len(sample.controls)} condition images; the qwen-image-2.1 "
                        f"trainer takes at most {MAX_CONDITIONS}")
    check_side(sample.target, "the target", sample.key)
    for i, control in enumerate(sample.controls):
        check_side(control, f"condition {i}", sample.key)
    if sample.mask is not None and sample.mask.size != sample.target.size:
        raise UserError(f"sample '{sample.key}': the mask is {sample.mask.width}x{sample.mask.height}, the target "
                        f"{sample.target.width}x{sample.target.height}; they must match")


def rgba(image: Image) -> Image:
    return image if image.mode == "RGBA" else image.convert("RGBA")


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str, conditions: list[Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt states [1, L, D] (text encoder's dtype and device) and image slots [1, L] bool, as the pipeline's
    ``_get_qwen_prompt_embeds`` gives them for ``conditions`` (RGBA, at their final size)."""
    te = pipe.text_encoder
    hidden, _, slots = pipe._get_qwen_prompt_embeds(prompt, image=list(conditions) or None, device=device_of(te))
    return hidden, slots.bool()


@torch.no_grad()
def encode_image(pipe: Any, image: Image) -> tuple[torch.Tensor, Grid]:
    """Flattened, normalised latents [1, N, 64] (VAE dtype and device) and the token grid of ``image``."""
    vae = pipe.vae
    width, height = image.size
    pixels = pipe.image_processor.preprocess(rgba(image), width=width, height=height).unsqueeze(2)
    latents = pipe._encode_vae_image(pixels.to(device_of(vae), vae.dtype), generator=None)  # [1, 64, 1, h, w]
    channels, lat_h, lat_w = latents.shape[1], latents.shape[3], latents.shape[4]
    return pipe._pack_latents(latents, 1, channels, lat_h, lat_w), (lat_h, lat_w)


def token_mask(mask: Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return mask_to_tokens(pixels, vae_factor=16, patch=1)


def _prompt(pipe: Any, prompt: str, conditions: list[Image]) -> PromptEmbeds:
    hidden, slots = encode_prompt(pipe, prompt, conditions)
    return PromptEmbeds(hidden=hidden[0].detach().to("cpu", torch.float32), image_slots=slots[0].cpu())


def encode_samples(encoders: Image21Encoders, samples: list[EditSample], model: ModelConfig,
                   empty_prompt: bool) -> list[EncodedSample]:
    """One ``EncodedSample`` per sample, in order (see the module docstring)."""
    for sample in samples:
        check_sample(sample)
    pipe = encoders.pipeline()
    out = []
    for sample in samples:
        latents, grid = encode_image(pipe, sample.target)
        conditions = [rgba(c) for c in sample.controls]
        controls, control_grids = [], []
        for condition in conditions:
            packed, control_grid = encode_image(pipe, condition)
            controls.append(packed[0].detach().to("cpu", torch.float32))
            control_grids.append(control_grid)
        out.append(EncodedSample(
            key=sample.key,
            latents=latents[0].detach().to("cpu", torch.float32),
            grid=grid,
            prompt=_prompt(pipe, sample.prompt, conditions),
            controls=controls,
            control_grids=control_grids,
            mask=None if sample.mask is None else token_mask(sample.mask),
            empty_prompt=_prompt(pipe, "", conditions) if empty_prompt else None,
        ))
    return out
