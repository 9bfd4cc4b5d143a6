"""``Trainer.encode`` for the Qwen trainers: VAE latents, Qwen2.5-VL prompt embeddings, token-space edit masks.

What one ``EncodedSample`` holds (tensors on CPU, **float32** whatever ``model.dtype`` the encoders run in: the
cache keeps full precision and ``Batch.to`` casts to the compute dtype):

- ``latents`` [N, 64]: the target through ``AutoencoderKLQwenImage`` as a 5-D ``[1, 3, 1, H, W]`` video of one
  frame (mode of the latent distribution), normalised ``(z - latents_mean) / latents_std`` and packed 2x2 —
  the pipeline's own ``_encode_vae_image`` and ``_pack_latents``; ``grid`` = (H/16, W/16).
- ``controls`` / ``control_grids``: every control the same way, each at the size the data stage gave it (by
  default the pipeline's: ``calculate_dimensions(1024 * 1024, ratio)``, see ``qflux_qwen.variants``).
- ``prompt``: ``PromptEmbeds(hidden [L, D], mask [L] (ones), pooled=None)``: the last hidden state of
  Qwen2.5-VL over the pipeline's chat template, with the control image(s) as vision input and the template
  prefix dropped (``prompt_template_encode_start_idx``) — the pipeline's ``_get_qwen_prompt_embeds``.
- ``empty_prompt``: the same for ``""`` (with the same control images) when caption dropout is on.
- ``mask`` [N]: ``EditSample.mask`` (white = edited) in [0, 1] -> ``mask_to_tokens`` (``qflux.plugin_api``).

Sizes are the data stage's job (``TrainerInfo.condition_sizing``, ``data.control_resolution`` /
``data.vl_resolution``): every image is encoded at the size it is given. The VL encoder sees
``EditSample.vl_controls`` when the data stage made them (the plus pipelines' ~384 x 384 copies, cut from the
same crop as the control), else: ``qwen-edit``: the control itself (as ``QwenImageEditPipeline``, which gives
its one ~1 MP image to VAE and VL encoder); ``qwen-edit-plus`` / ``qwen-edit-2511``: each control resized to an
area of 384 x 384 (the plus pipeline's ``calculate_dimensions(CONDITION_IMAGE_SIZE, ratio)`` and
``image_processor.resize``). Plus controls are given as "Picture i: <|vision_start|><|image_pad|><|vision_end|>". A sample without control (text-to-image) is encoded
with the same system prompt and no vision input (the plus template with no picture).

``model.max_sequence_length`` (default None: no limit, as the pipelines) cuts the prompt embeddings after the
template prefix is dropped; the pipelines' hard limit of 1024 is checked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qflux.plugin_api import EncodedSample, PromptEmbeds, UserError, device_of, mask_to_tokens
from qflux_qwen.variants import QwenVariant

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import EditSample, Grid, ModelConfig
    from qflux_qwen.encoders import QwenEncoders

log = logging.getLogger(__name__)

EDIT_PIPELINE = "QwenImageEditPipeline"
PLUS_PIPELINE = "QwenImageEditPlusPipeline"
MAX_SEQUENCE_LENGTH = 1024  # the pipelines' limit (check_inputs)


def vl_images(variant: QwenVariant, controls: list[Image], image_processor: Any) -> list[Image]:
    """The control images as the VL encoder sees them (see the module docstring)."""
    if variant.vl_area is None:
        return list(controls)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    out = []
    for image in controls:
        width, height = calculate_dimensions(variant.vl_area, image.width / image.height)
        out.append(image_processor.resize(image, height, width))
    return out


@torch.no_grad()
def encode_prompt(
    variant: QwenVariant,
    encoders: QwenEncoders,
    prompt: str,
    controls: list[Image],
    max_sequence_length: int | None = None,
    pipelines: dict[str, Any] | None = None,
    vl_controls: list[Image] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt hidden states [1, L, D] and mask [1, L] (encoders' dtype and device), as the pipeline's
    ``_get_qwen_prompt_embeds`` computes them. ``vl_controls``: the VL encoder's images exactly as given (the
    data stage sized them); empty or None: derived from ``controls`` (see the module docstring)."""
    pipelines = pipelines if pipelines is not None else {}
    name = PLUS_PIPELINE if (variant.multi_image or not controls) else EDIT_PIPELINE
    if name not in pipelines:
        pipelines[name] = encoders.pipeline(name)
    pipe = pipelines[name]
    if not controls:
        image = None  # plus template without a picture: same system prompt, text only
    elif vl_controls:
        image = list(vl_controls) if variant.multi_image else vl_controls[0]
    elif variant.multi_image:
        image = vl_images(variant, controls, pipe.image_processor)
    else:
        image = controls[0]
    te = encoders.text_encoder
    hidden, mask = pipe._get_qwen_prompt_embeds(prompt, image=image, device=device_of(te), dtype=te.dtype)
    if max_sequence_length is not None and hidden.shape[1] > max_sequence_length:
        log.warning(
            "prompt of %d tokens (template, image tokens and text) cut to model.max_sequence_length=%d: %r",
            hidden.shape[1], max_sequence_length, prompt[:80],
        )
        hidden, mask = hidden[:, :max_sequence_length], mask[:, :max_sequence_length]
    return hidden, mask


def check_size(image: Image, what: str, key: str) -> None:
    if image.width % 16 or image.height % 16:
        raise UserError(f"sample '{key}': {what} is {image.width}x{image.height}; sides must be multiples of 16")


@torch.no_grad()
def encode_image(encoders: QwenEncoders, image: Image, pipe: Any = None) -> tuple[torch.Tensor, Grid]:
    """Packed, normalised latents [1, N, C] (VAE dtype and device) and the token grid of ``image`` at its size."""
    pipe = pipe if pipe is not None else encoders.pipeline(EDIT_PIPELINE)
    vae = encoders.vae
    width, height = image.size
    pixels = pipe.image_processor.preprocess(image.convert("RGB"), height=height, width=width).unsqueeze(2)
    latents = pipe._encode_vae_image(pixels.to(device_of(vae), vae.dtype), generator=None)  # [1, z, 1, h, w]
    channels, lat_h, lat_w = latents.shape[1], latents.shape[3], latents.shape[4]
    packed = pipe._pack_latents(latents, 1, channels, lat_h, lat_w)
    return packed, (lat_h // 2, lat_w // 2)


def token_mask(mask: Image, vae_factor: int = 8) -> torch.Tensor:
    """Edit mask image (white = edited) -> token weights [N] in [0, 1]."""
    pixels = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return mask_to_tokens(pixels, vae_factor=vae_factor, patch=2)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def _prompt_embeds(hidden: torch.Tensor, mask: torch.Tensor) -> PromptEmbeds:
    return PromptEmbeds(hidden=_cpu(hidden[0]), mask=mask[0].to("cpu", torch.long), pooled=None)


def check_sample(variant: QwenVariant, sample: EditSample) -> None:
    if sample.target is None:
        raise UserError(f"sample '{sample.key}' has no target image; training samples need one")
    if len(sample.controls) > variant.max_controls:
        files = ", ".join(str(f) for f in sample.files) or "no files"
        raise UserError(
            f"sample '{sample.key}' ({files}) has {len(sample.controls)} control images; the {variant.name} "
            f"trainer takes at most {variant.max_controls}"
            + ("" if variant.max_controls > 1 else " (use qwen-edit-plus or qwen-edit-2511 for several)")
        )
    check_size(sample.target, "the target", sample.key)
    for i, control in enumerate(sample.controls):
        check_size(control, f"control {i}", sample.key)
    if sample.mask is not None and sample.mask.size != sample.target.size:
        raise UserError(
            f"sample '{sample.key}': the mask is {sample.mask.width}x{sample.mask.height}, the target "
            f"{sample.target.width}x{sample.target.height}; they must match"
        )


def encode_samples(
    variant: QwenVariant,
    encoders: QwenEncoders,
    samples: list[EditSample],
    model: ModelConfig,
    empty_prompt: bool,
) -> list[EncodedSample]:
    """One ``EncodedSample`` per sample, in order (see the module docstring)."""
    max_len = model.max_sequence_length
    if max_len is not None and max_len > MAX_SEQUENCE_LENGTH:
        raise UserError(f"model.max_sequence_length is {max_len}; Qwen-Image accepts at most {MAX_SEQUENCE_LENGTH}")
    for sample in samples:
        check_sample(variant, sample)
    pipelines: dict[str, Any] = {EDIT_PIPELINE: encoders.pipeline(EDIT_PIPELINE)}
    out = []
    for sample in samples:
        latents, grid = encode_image(encoders, sample.target, pipelines[EDIT_PIPELINE])
        controls, control_grids = [], []
        for control in sample.controls:
            packed, control_grid = encode_image(encoders, control, pipelines[EDIT_PIPELINE])
            controls.append(_cpu(packed[0]))
            control_grids.append(control_grid)
        vl = sample.vl_controls
        prompt = _prompt_embeds(*encode_prompt(variant, encoders, sample.prompt, sample.controls, max_len, pipelines, vl))
        empty = (
            _prompt_embeds(*encode_prompt(variant, encoders, "", sample.controls, max_len, pipelines, vl))
            if empty_prompt
            else None
        )
        out.append(
            EncodedSample(
                key=sample.key,
                latents=_cpu(latents[0]),
                grid=grid,
                prompt=prompt,
                controls=controls,
                control_grids=control_grids,
                mask=None if sample.mask is None else token_mask(sample.mask, encoders.vae_factor),
                empty_prompt=empty,
            )
        )
    return out
