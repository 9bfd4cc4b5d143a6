"""``Trainer.sample`` for Kontext: one image through ``FluxKontextPipeline`` and the current transformer.

Every call builds a ``FluxKontextPipeline`` around ``bundle.transformer`` and the encoders with a FRESH
``FlowMatchEulerDiscreteScheduler.from_config(...)`` (never the training scheduler), at exactly the requested
``height x width`` (``max_area = height * width``), ``generator = torch.Generator("cpu").manual_seed(seed)``,
and ``_auto_resize=False``: the control keeps the size the data stage planned, which by default IS the
pipeline's snap to ``PREFERRED_KONTEXT_RESOLUTIONS`` (``qflux_kontext.plugin.CONDITION_SIZING``), so sampling
matches training whatever ``data.control_resolution`` chose.

- no control: text-to-image; one control: ``image=controls[0]`` at its own size. Both call the pipeline.
- two or more controls (the pipeline takes one): ``denoise`` below, a denoising loop that reuses the
  pipeline's prompt encoder, image processor, VAE path, noise, timestep schedule (``flow_match_timesteps``:
  its ``calculate_shift`` and ``retrieve_timesteps``) and scheduler step, and runs the transformer through
  ``predict.forward``, i.e. the training forward: control i gets image-id index i + 1. With one control it
  reproduces the pipeline.
  It is also used when the transformer's dtype differs from the encoders' (the pipeline assumes one dtype).

Encoders never beside the transformer: ``encode_request`` (``Trainer.encode_request``) runs the encoder half
before the transformer loads (CLIP + T5 embeddings of the prompt and, with true CFG, the negative prompt; each
control through the VAE encoder, as the pipeline resizes and encodes it), ``decoder`` keeps the VAE and the
scheduler config only, and ``sample(..., encoded=...)`` denoises and decodes from them (the pipeline gets
``prompt_embeds`` and the controls' latents). A raw request is encoded first with the whole encoders, so both
ways give the same image.

The encoders (the decoder) are moved to the transformer's device for the call and moved back after; the
transformer is put in eval mode for the call and its train/eval mode restored after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from qflux.plugin_api import UserError, compute_dtype, device_of, eval_mode, flow_match_timesteps
from qflux_kontext.encoding import encode_prompts, sequence_length
from qflux_kontext.packing import pack_latents, token_grid, unpack_latents
from qflux_kontext.predict import forward

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import ModelBundle, ModelConfig, SampleRequest
    from qflux_kontext.encoders import KontextEncoders


@dataclass
class KontextEncoded:
    """``encode_request``'s result, tensors on CPU: T5 ``hidden`` [1, L, D] and CLIP ``pooled`` [1, P] in the text
    encoders' dtype, the same for the negative prompt (true CFG only), and each control's normalised VAE latents
    [1, C, h, w] (unpacked, in the VAE's dtype)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    neg_hidden: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    controls: list[torch.Tensor] = field(default_factory=list)


def build_pipeline(transformer: torch.nn.Module, encoders: KontextEncoders):
    """A ``FluxKontextPipeline`` of ``transformer`` + ``encoders`` with a fresh scheduler instance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(encoders.scheduler_config),
        vae=encoders.vae,
        text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer,
        text_encoder_2=encoders.text_encoder_2,
        tokenizer_2=encoders.tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _prepared(transformer: torch.nn.Module, encoders: KontextEncoders) -> Iterator[None]:
    """The encoders on the transformer's device and the transformer in eval mode, for the block."""
    device = device_of(transformer)
    home = encoders.device
    if home != device:
        encoders.to(device)
    try:
        with eval_mode(transformer):
            yield
    finally:
        if home != device:
            encoders.to(home)


def _control_size(image: Image, multiple: int) -> tuple[int, int]:
    """(height, width) the pipeline uses for a control with ``_auto_resize=False``."""
    return image.height // multiple * multiple, image.width // multiple * multiple


@torch.no_grad()
def encode_request(encoders: KontextEncoders, request: SampleRequest, model: ModelConfig) -> KontextEncoded:
    """``Trainer.encode_request``: the prompt (and, with ``true_cfg > 1``, the negative prompt) through CLIP + T5
    and every control through the VAE encoder as the pipeline does it (floored to a multiple of 16, resized,
    preprocessed, the mode of the latent distribution, normalised); tensors moved to the CPU."""
    from diffusers import FluxKontextPipeline

    msl = sequence_length(encoders, model)
    hidden, pooled = encode_prompts(encoders, [request.prompt], msl)
    encoded = KontextEncoded(hidden.cpu(), pooled.cpu())
    if request.true_cfg > 1:
        neg_hidden, neg_pooled = encode_prompts(encoders, [request.negative_prompt], msl)
        encoded.neg_hidden, encoded.neg_pooled = neg_hidden.cpu(), neg_pooled.cpu()
    if request.controls:  # the pipeline's image processor and VAE path, without a transformer
        pipe = FluxKontextPipeline(scheduler=None, vae=encoders.vae, text_encoder=None, tokenizer=None,
                                   text_encoder_2=None, tokenizer_2=None, transformer=None)
        vae, multiple = encoders.vae, pipe.vae_scale_factor * 2
        for image in request.controls:
            h, w = _control_size(image, multiple)
            pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w)
            encoded.controls.append(pipe._encode_vae_image(pixels.to(device_of(vae), vae.dtype), None).cpu())
    return encoded


def decoder(encoders: KontextEncoders) -> KontextEncoders:
    """``Trainer.decoder``: the VAE and the scheduler config, without the text encoders and tokenizers."""
    return replace(encoders, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@torch.no_grad()
def denoise(pipe, encoded: KontextEncoded, request: SampleRequest, guidance: float):
    """The pipeline's denoising loop for any number of controls (see the module docstring)."""
    from diffusers.utils.torch_utils import randn_tensor

    transformer = pipe.transformer
    device, dtype = device_of(transformer), compute_dtype(transformer)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    factor = pipe.vae_scale_factor

    hidden, pooled = encoded.hidden.to(device, dtype), encoded.pooled.to(device, dtype)
    cfg = request.true_cfg > 1
    if cfg:
        neg_hidden, neg_pooled = encoded.neg_hidden.to(device, dtype), encoded.neg_pooled.to(device, dtype)

    vae = pipe.vae
    controls, control_grids = [], []
    for z in encoded.controls:
        controls.append(pack_latents(z).to(device, dtype))
        control_grids.append((z.shape[2] // 2, z.shape[3] // 2))

    grid = token_grid(request.height, request.width, factor)
    channels = pipe.transformer.config.in_channels // 4
    noise = randn_tensor((1, channels, grid[0] * 2, grid[1] * 2), generator=generator, device=device, dtype=dtype)
    latents = pack_latents(noise)

    scheduler = pipe.scheduler
    for t in flow_match_timesteps(scheduler, request.steps, latents.shape[1], device):
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        v = forward(transformer, latents, timestep, hidden, pooled, grid, controls, control_grids, guidance)
        if cfg:
            v_neg = forward(
                transformer, latents, timestep, neg_hidden, neg_pooled, grid, controls, control_grids, guidance
            )
            v = v_neg + request.true_cfg * (v - v_neg)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]

    z = unpack_latents(latents, grid) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    image = vae.decode(z.to(device_of(vae), vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def sample(bundle: ModelBundle, request: SampleRequest, loop: bool | None = None,
           encoded: KontextEncoded | None = None) -> Image:
    """``Trainer.sample``. ``loop``: force (True) or forbid (False) ``denoise``; None chooses (module docstring).
    ``request.guidance`` None: the trainer's ``model.options.sample_guidance``. ``encoded``: ``encode_request``'s
    (``bundle.encoders`` may then be ``decoder``'s); None: the request is encoded here with the encoders."""
    from qflux_kontext.options import KontextOptions

    encoders = bundle.encoders
    if encoders is None:
        raise ValueError("kontext sampling needs the encoders: call Trainer.load_encoders first")
    if request.guidance is None:  # validation and `qflux sample` without --guidance
        request = replace(request, guidance=KontextOptions.model_validate(bundle.model.options).sample_guidance)
    if request.height % 16 or request.width % 16 or request.height < 16 or request.width < 16:
        raise UserError(f"sample size {request.width}x{request.height}: sides must be multiples of 16")
    if request.true_cfg > 1 and encoded is not None and encoded.neg_hidden is None:
        raise ValueError("the request was encoded without its negative prompt (true_cfg <= 1 then)")
    transformer = bundle.transformer
    with _prepared(transformer, encoders):
        if encoded is None:
            encoded = encode_request(encoders, request, bundle.model)
        if loop is None:
            dtypes = {compute_dtype(transformer), encoders.vae.dtype, encoded.hidden.dtype}
            loop = len(encoded.controls) > 1 or len(dtypes) > 1
        if not loop and len(encoded.controls) > 1:
            raise ValueError("FluxKontextPipeline takes one control image; use loop=True")
        pipe = build_pipeline(transformer, encoders)
        if loop:
            return denoise(pipe, encoded, request, request.guidance)
        device = device_of(transformer)
        cfg = request.true_cfg > 1
        return pipe(
            image=encoded.controls[0].to(device) if encoded.controls else None,
            prompt_embeds=encoded.hidden.to(device),
            pooled_prompt_embeds=encoded.pooled.to(device),
            negative_prompt_embeds=encoded.neg_hidden.to(device) if cfg else None,
            negative_pooled_prompt_embeds=encoded.neg_pooled.to(device) if cfg else None,
            true_cfg_scale=request.true_cfg,
            height=request.height,
            width=request.width,
            max_area=request.height * request.width,
            _auto_resize=False,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        ).images[0]
