"""``Trainer.encode`` for the FLUX.2 trainers: VAE latents of target and references, prompt embeddings, masks.

What one ``EncodedSample`` holds (tensors on CPU, **float32** whatever ``model.dtype`` the encoders run in: the
cache keeps full precision and ``Batch.to`` casts to the compute dtype):

- ``latents`` [N, 128]: the target through ``AutoencoderKLFlux2`` (mode of the latent distribution), 2x2
  patchified and normalised by the VAE's batch-norm statistics, then flattened: the pipelines' own
  ``_encode_vae_image`` and ``_pack_latents``; ``grid`` = (H/16, W/16).
- ``controls`` / ``control_grids``: every reference the same way. A reference goes through the pipelines'
  reference preparation (``reference_pixels``: shrunk to 1024 x 1024 pixels when larger, sides floored to 16,
  ``preprocess(..., resize_mode="crop")``); the data stage already gives references that size
  (``ConditionSizing(shrink_only=True)``), so for training samples that step changes nothing.
- ``prompt``: ``PromptEmbeds(hidden [L, 3 * D], mask=None)``: the text encoder's hidden states of the layers
  the pipeline stacks (dev: Mistral3 layers 10/20/30 over its chat template with the system message; klein: Qwen3
  layers 9/18/27 over the chat template with thinking off), padded to ``max_sequence_length`` (512, the
  pipelines' default; ``model.max_sequence_length`` overrides it). The transformer sees all L tokens, padding
  included, as in the pipelines (they pass no text mask), so no mask is stored.
- ``empty_prompt``: the same for ``""`` when caption dropout is on. FLUX.2's prompt does not see the
  references, so reference dropout (``data.reference_dropout``) needs no other prompt.
- ``mask`` [N]: ``EditSample.mask`` (white = edited) in [0, 1] -> ``mask_to_tokens`` (``qflux.plugin_api``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qflux.plugin_api import EncodedSample, PromptEmbeds, UserError, device_of, mask_to_tokens
from qflux_flux2.variants import MULTIPLE, REFERENCE_AREA, Flux2Variant

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import EditSample, Grid, ModelConfig
    from qflux_flux2.encoders import Flux2Encoders

MAX_SEQUENCE_LENGTH = 512  # the pipelines' default (and the length their prompts are padded to)
MIN_REFERENCE_SIDE = 64  # Flux2ImageProcessor.check_image_input: the pipelines refuse smaller references
MAX_REFERENCE_ASPECT = 8


def sequence_length(model: ModelConfig) -> int:
    return MAX_SEQUENCE_LENGTH if model.max_sequence_length is None else int(model.max_sequence_length)


@torch.no_grad()
def encode_prompt(variant: Flux2Variant, encoders: Flux2Encoders, prompt: str, max_sequence_length: int,
                  pipe: Any = None) -> torch.Tensor:
    """Prompt embeddings [1, L, 3D] (encoder's dtype and device), as the pipeline's ``encode_prompt``."""
    pipe = pipe if pipe is not None else encoders.pipeline()
    te = encoders.text_encoder
    common = dict(text_encoder=te, tokenizer=encoders.tokenizer, prompt=prompt, dtype=te.dtype, device=device_of(te),
                  max_sequence_length=max_sequence_length, hidden_states_layers=list(variant.text_layers))
    if variant.name == "flux2-dev":
        return pipe._get_mistral_3_small_prompt_embeds(system_message=pipe.system_message, **common)
    return pipe._get_qwen3_prompt_embeds(**common)


def check_reference(image: Image, what: str, key: str) -> None:
    """The pipelines' ``check_image_input``, answered as a ``UserError`` naming the sample."""
    width, height = image.size
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise UserError(f"sample '{key}': {what} is {width}x{height}; the FLUX.2 pipelines need both sides of a "
                        f"reference to be at least {MIN_REFERENCE_SIDE} px")
    if max(width / height, height / width) > MAX_REFERENCE_ASPECT:
        raise UserError(f"sample '{key}': {what} is {width}x{height}; the FLUX.2 pipelines refuse references "
                        f"longer than {MAX_REFERENCE_ASPECT}:1")


def reference_pixels(pipe: Any, image: Image) -> torch.Tensor:
    """[1, 3, h, w] in [-1, 1]: the pipelines' step "4. process images" for one reference."""
    image = image.convert("RGB")
    width, height = image.size
    if width * height > REFERENCE_AREA:
        image = pipe.image_processor._resize_to_target_area(image, REFERENCE_AREA)
        width, height = image.size
    width, height = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    return pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")


@torch.no_grad()
def encode_pixels(encoders: Flux2Encoders, pixels: torch.Tensor, pipe: Any) -> tuple[torch.Tensor, Grid]:
    """Packed, normalised latents [1, N, 128] (VAE dtype and device) and the token grid of ``pixels``."""
    vae = encoders.vae
    latents = pipe._encode_vae_image(pixels.to(device_of(vae), vae.dtype), generator=None)  # [1, 128, h, w]
    return pipe._pack_latents(latents), (latents.shape[2], latents.shape[3])


def encode_target(encoders: Flux2Encoders, image: Image, pipe: Any) -> tuple[torch.Tensor, Grid]:
    width, height = image.size
    pixels = pipe.image_processor.preprocess(image.convert("RGB"), height=height, width=width)
    return encode_pixels(encoders, pixels, pipe)


def token_mask(mask: Image, vae_factor: int = 8) -> torch.Tensor:
    """Edit mask image (white = edited) -> token weights [N] in [0, 1]."""
    pixels = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return mask_to_tokens(pixels, vae_factor=vae_factor, patch=2)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def check_sample(sample: EditSample, max_references: int) -> None:
    if sample.target is None:
        raise UserError(f"sample '{sample.key}' has no target image; training samples need one")
    width, height = sample.target.size
    if width % MULTIPLE or height % MULTIPLE:
        raise UserError(f"sample '{sample.key}': the target is {width}x{height}; sides must be multiples of 16")
    if len(sample.controls) > max_references:
        raise UserError(f"sample '{sample.key}' has {len(sample.controls)} reference images; the FLUX.2 trainers "
                        f"take at most {max_references}")
    for i, control in enumerate(sample.controls):
        check_reference(control, f"reference {i}", sample.key)
    if sample.mask is not None and sample.mask.size != sample.target.size:
        raise UserError(f"sample '{sample.key}': the mask is {sample.mask.width}x{sample.mask.height}, the target "
                        f"{width}x{height}; they must match")


def encode_samples(variant: Flux2Variant, encoders: Flux2Encoders, samples: list[EditSample], model: ModelConfig,
                   empty_prompt: bool) -> list[EncodedSample]:
    """One ``EncodedSample`` per sample, in order (see the module docstring)."""
    for sample in samples:
        check_sample(sample, variant.info.max_controls)
    length = sequence_length(model)
    pipe = encoders.pipeline()
    empty = PromptEmbeds(hidden=_cpu(encode_prompt(variant, encoders, "", length, pipe)[0])) if empty_prompt else None
    out = []
    for sample in samples:
        latents, grid = encode_target(encoders, sample.target, pipe)
        controls, control_grids = [], []
        for control in sample.controls:
            packed, control_grid = encode_pixels(encoders, reference_pixels(pipe, control), pipe)
            controls.append(_cpu(packed[0]))
            control_grids.append(control_grid)
        prompt = PromptEmbeds(hidden=_cpu(encode_prompt(variant, encoders, sample.prompt, length, pipe)[0]))
        out.append(EncodedSample(
            key=sample.key,
            latents=_cpu(latents[0]),
            grid=grid,
            prompt=prompt,
            controls=controls,
            control_grids=control_grids,
            mask=None if sample.mask is None else token_mask(sample.mask),
            empty_prompt=empty,
        ))
    return out
