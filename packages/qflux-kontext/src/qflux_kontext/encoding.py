"""``Trainer.encode`` for Kontext: VAE latents, CLIP + T5 prompt embeddings, token-space edit masks.

What one ``EncodedSample`` holds (tensors on CPU, **float32** whatever ``model.dtype`` the encoders run in:
the cache keeps full precision and ``Batch.to`` casts to the compute dtype):

- ``latents`` [N, 64]: the target through the VAE (mode of the latent distribution, as the pipeline's
  ``retrieve_latents(..., sample_mode="argmax")``), normalised ``(z - shift_factor) * scaling_factor`` and
  packed 2x2; ``grid`` = (H/16, W/16).
- ``controls`` / ``control_grids``: every control image the same way, each at the size the data stage gave it:
  by default the pipeline's own (``FluxKontextPipeline`` snaps a control to the
  ``PREFERRED_KONTEXT_RESOLUTIONS`` entry of closest aspect, ~1 MP: ``qflux_kontext.plugin.CONDITION_SIZING``).
- ``prompt``: ``PromptEmbeds(hidden=T5 last hidden state [L, D], mask=None, pooled=CLIP pooled [P])`` with
  ``L = max_sequence_length`` (T5 padded to it, no attention mask, as in ``FluxKontextPipeline.encode_prompt``).
- ``empty_prompt``: the same for ``""`` when caption dropout is on.
- ``mask`` [N]: ``EditSample.mask`` (white = edited) in [0, 1] -> ``mask_to_tokens`` (``qflux.plugin_api``).

Encoder calls are batched: unique prompts (plus ``""``) in CLIP and T5 calls of up to ``PROMPT_CHUNK``,
images of equal size in VAE calls of up to ``VAE_CHUNK``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from qflux.plugin_api import EncodedSample, PromptEmbeds, UserError, device_of, mask_to_tokens
from qflux_kontext.packing import pack_latents, token_grid

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import EditSample, ModelConfig
    from qflux_kontext.encoders import KontextEncoders

log = logging.getLogger(__name__)

MAX_CONTROLS = 3
MAX_T5_LENGTH = 512  # FLUX's limit (FluxKontextPipeline.check_inputs)
VAE_CHUNK = 4  # images per VAE call
PROMPT_CHUNK = 16  # prompts per CLIP / T5 call


def sequence_length(encoders: KontextEncoders, model: ModelConfig) -> int:
    """``model.max_sequence_length`` or the model's default (512 real, 32 ``builtin:tiny``)."""
    n = model.max_sequence_length or encoders.max_sequence_length
    if n > MAX_T5_LENGTH:
        raise UserError(f"model.max_sequence_length is {n}; FLUX.1 Kontext accepts at most {MAX_T5_LENGTH}")
    return n


@torch.no_grad()
def encode_prompts(
    encoders: KontextEncoders, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states [B, L, D] and CLIP pooled embeddings [B, P] (in the encoders' dtype and device),
    as ``FluxKontextPipeline.encode_prompt`` computes them."""
    tok, te = encoders.tokenizer, encoders.text_encoder
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = te(ids.to(device_of(te)), output_hidden_states=False).pooler_output.to(te.dtype)

    tok2, te2 = encoders.tokenizer_2, encoders.text_encoder_2
    ids2 = tok2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    longest = tok2(prompts, padding="longest", return_tensors="pt").input_ids.shape[-1]
    if longest > max_sequence_length:
        cut = [p for p in prompts if len(tok2(p).input_ids) > max_sequence_length]
        log.warning(
            "%d prompt(s) longer than max_sequence_length=%d T5 tokens were truncated, e.g. %r",
            len(cut),
            max_sequence_length,
            cut[0][:80],
        )
    hidden = te2(ids2.to(device_of(te2)), output_hidden_states=False)[0].to(te2.dtype)
    return hidden, pooled


def _check_size(image: Image, what: str, key: str) -> None:
    w, h = image.size
    if w % 16 or h % 16:
        raise UserError(f"sample '{key}': {what} is {w}x{h}; Kontext needs sides that are multiples of 16")


@torch.no_grad()
def encode_images(encoders: KontextEncoders, images: list[Image]) -> list[torch.Tensor]:
    """Packed, normalised latents [h*w, C*4] per image (float32, CPU); equal sizes share VAE calls."""
    from diffusers.image_processor import VaeImageProcessor

    vae = encoders.vae
    processor = VaeImageProcessor(vae_scale_factor=encoders.vae_factor * 2)
    shift = vae.config.shift_factor or 0.0
    scale = vae.config.scaling_factor
    device = device_of(vae)
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.size, []).append(i)
    for (w, h), idx in by_size.items():
        for start in range(0, len(idx), VAE_CHUNK):
            chunk = idx[start : start + VAE_CHUNK]
            rgb = [images[i] if images[i].mode == "RGB" else images[i].convert("RGB") for i in chunk]
            pixels = processor.preprocess(rgb, height=h, width=w).to(device=device, dtype=vae.dtype)
            z = vae.encode(pixels).latent_dist.mode()
            z = (z - shift) * scale
            tokens = pack_latents(z).float().cpu()
            for j, i in enumerate(chunk):
                out[i] = tokens[j].clone()
    return out  # type: ignore[return-value]


def encode_mask(mask: Image, size: tuple[int, int], vae_factor: int, key: str) -> torch.Tensor:
    """PIL mask (white = edited) -> token-space mask [N] in [0, 1]."""
    if mask.size != size:
        raise UserError(f"sample '{key}': the mask is {mask.size[0]}x{mask.size[1]}, the target {size[0]}x{size[1]}")
    gray = mask if mask.mode == "L" else mask.convert("L")
    pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    return mask_to_tokens(pixels, vae_factor=vae_factor, patch=2)


def encode_samples(
    encoders: KontextEncoders, samples: list[EditSample], model: ModelConfig, empty_prompt: bool
) -> list[EncodedSample]:
    for s in samples:
        if s.target is None:
            raise UserError(f"sample '{s.key}' has no target image; encoding for training needs one")
        if len(s.controls) > MAX_CONTROLS:
            raise UserError(f"sample '{s.key}' has {len(s.controls)} controls; kontext takes at most {MAX_CONTROLS}")
        _check_size(s.target, "the target", s.key)
        for i, c in enumerate(s.controls):
            _check_size(c, f"control {i}", s.key)

    if not samples:
        return []
    # prompts: the unique ones (plus "") in batched calls
    unique = list(dict.fromkeys([s.prompt for s in samples] + ([""] if empty_prompt else [])))
    length = sequence_length(encoders, model)
    parts = [
        encode_prompts(encoders, unique[i : i + PROMPT_CHUNK], length) for i in range(0, len(unique), PROMPT_CHUNK)
    ]
    hidden = torch.cat([h for h, _ in parts]).float().cpu()
    pooled = torch.cat([p for _, p in parts]).float().cpu()

    def prompt_of(text: str) -> PromptEmbeds:
        i = unique.index(text)
        return PromptEmbeds(hidden=hidden[i].clone(), mask=None, pooled=pooled[i].clone())

    # images: targets and controls together, grouped by size
    images: list[Image] = []
    for s in samples:
        images.append(s.target)
        images.extend(s.controls)
    latents = iter(encode_images(encoders, images))

    factor = encoders.vae_factor
    out = []
    for s in samples:
        target = next(latents)
        controls = [next(latents) for _ in s.controls]
        w, h = s.target.size
        out.append(
            EncodedSample(
                key=s.key,
                latents=target,
                grid=token_grid(h, w, factor),
                prompt=prompt_of(s.prompt),
                controls=controls,
                control_grids=[token_grid(c.size[1], c.size[0], factor) for c in s.controls],
                mask=encode_mask(s.mask, s.target.size, factor, s.key) if s.mask is not None else None,
                empty_prompt=prompt_of("") if empty_prompt else None,
            )
        )
    return out
