"""``Trainer.sample`` for ``qwen-image-2.1``: one image with the current (LoRA) transformer.

The denoising loop of ``QwenImage21Pipeline.__call__`` with ``use_kv_cache=False``, written out with the pipeline's
own helpers (prompt encoding, ``prepare_latents``, ``_encode_vae_image``, ``_unpack_latents``) so the current
transformer runs as it is: sigmas from the pipeline config's ``sample_sigmas`` (else ``linspace(1, 1/steps)``),
``mu = calculate_shift(target tokens, ...)`` from the scheduler config, a FRESH scheduler per call, true CFG with
``request.negative_prompt`` when ``request.true_cfg > 1``, then the VAE decode (RGBA, returned as RGB).

The conditions are encoded at the size they are given (the data stage sized them with the pipeline's rule, sides
multiples of 32), as ``Trainer.encode`` encodes training samples. The pipeline's KV cache (``use_kv_cache=True``,
its default) reuses the text and condition keys across steps: the same result up to float rounding. Noise comes
from a CPU generator seeded with ``request.seed``.

Encoders never beside the transformer: ``encode_request`` (``Trainer.encode_request``) runs the encoder half
before the transformer loads (prompt and negative prompt with the conditions, each condition through the VAE),
``decoder`` keeps the VAE and the scheduler config only, and ``sample(..., encoded=...)`` denoises and decodes
from them. A raw request is encoded first with the whole encoders, so both ways give the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from qflux.plugin_api import UserError, device_of, eval_mode, unwrap
from qflux_qwen.image21.encoding import check_side, encode_image, encode_prompt, rgba
from qflux_qwen.image21.info import MAX_CONDITIONS, SIDE_MULTIPLE
from qflux_qwen.image21.predict import forward

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import Grid, ModelBundle, ModelConfig, SampleRequest
    from qflux_qwen.image21.loading import Image21Encoders


@dataclass
class Image21Encoded:
    """``encode_request``'s result, tensors on CPU: prompt states ``hidden`` [1, L, D] and image ``slots`` [1, L]
    (the negative prompt's too, true CFG only), each condition's flattened latents [1, N, 64] and grid."""

    hidden: torch.Tensor
    slots: torch.Tensor
    negative: tuple[torch.Tensor, torch.Tensor] | None = None
    conditions: list[torch.Tensor] = field(default_factory=list)
    condition_grids: list[Grid] = field(default_factory=list)


def _size(request: SampleRequest) -> tuple[int, int]:
    if len(request.controls) > MAX_CONDITIONS:
        raise UserError(f"{len(request.controls)} condition images given; qwen-image-2.1 takes at most {MAX_CONDITIONS}")
    for i, control in enumerate(request.controls):
        check_side(control, f"condition {i}", "sample request")
    if request.steps < 1:
        raise UserError(f"sampling needs at least 1 step, got {request.steps}")
    height = request.height // SIDE_MULTIPLE * SIDE_MULTIPLE
    width = request.width // SIDE_MULTIPLE * SIDE_MULTIPLE
    if height < SIDE_MULTIPLE or width < SIDE_MULTIPLE:
        raise UserError(f"sample size {request.width}x{request.height} is too small (at least 32x32)")
    return height, width


def _encoders(bundle: ModelBundle) -> Image21Encoders:
    if bundle.encoders is None:
        from qflux_qwen.image21.loading import load_encoders

        bundle.encoders = load_encoders(bundle.model)
    return bundle.encoders


def timesteps_for(scheduler: object, sigmas: list[float] | None, steps: int, image_seq_len: int,
                  device: torch.device) -> torch.Tensor:
    import numpy as np
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    grid = sigmas if sigmas is not None else np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=grid, mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


def decode(pipe: object, latents: torch.Tensor, height: int, width: int) -> Image:
    vae = pipe.vae
    z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(device_of(vae), vae.dtype)
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    image = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0].convert("RGB")


@torch.no_grad()
def encode_request(encoders: Image21Encoders, request: SampleRequest, model: ModelConfig) -> Image21Encoded:
    """``Trainer.encode_request``: prompt(s) and conditions encoded as ``sample`` encodes them, on the CPU."""
    _size(request)
    pipe = encoders.pipeline()
    conditions = [rgba(c) for c in request.controls]
    hidden, slots = encode_prompt(pipe, request.prompt, conditions)
    encoded = Image21Encoded(hidden.cpu(), slots.cpu())
    if request.true_cfg > 1:
        negative = encode_prompt(pipe, request.negative_prompt, conditions)
        encoded.negative = (negative[0].cpu(), negative[1].cpu())
    for condition in conditions:
        packed, grid = encode_image(pipe, condition)
        encoded.conditions.append(packed.cpu())
        encoded.condition_grids.append(grid)
    return encoded


def decoder(encoders: Image21Encoders) -> Image21Encoders:
    """``Trainer.decoder``: the VAE, the scheduler config and the sampling grid, without the text encoder (the
    processor stays: no weights, and the pipeline's constructor reads its chat template)."""
    return replace(encoders, text_encoder=None)


@torch.no_grad()
def sample(bundle: ModelBundle, request: SampleRequest, encoded: Image21Encoded | None = None) -> Image:
    """``Trainer.sample``. ``encoded``: ``encode_request``'s (``bundle.encoders`` may then be ``decoder``'s);
    None: the request is encoded here with the encoders (loaded when the bundle has none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    height, width = _size(request)
    encoders = _encoders(bundle)
    if encoded is None:
        encoded = encode_request(encoders, request, bundle.model)
    if request.true_cfg > 1 and encoded.negative is None:
        raise ValueError("the request was encoded without its negative prompt (true_cfg <= 1 then)")
    transformer = bundle.transformer
    device = device_of(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(encoders.scheduler_config)
    pipe = encoders.pipeline(transformer=unwrap(transformer), scheduler=scheduler)

    with eval_mode(transformer):
        hidden, slots = encoded.hidden, encoded.slots
        negative = encoded.negative if request.true_cfg > 1 else None
        cond_latents = [packed.to(device) for packed in encoded.conditions]
        cond_grids = list(encoded.condition_grids)
        generator = torch.Generator("cpu").manual_seed(int(request.seed))
        channels = unwrap(transformer).config.in_channels
        latents, _ = pipe.prepare_latents(None, 1, channels, height, width, hidden.dtype, torch.device("cpu"),
                                          generator)
        latents = latents.to(device)
        hidden, slots = hidden.to(device), slots.to(device)
        grid = (height // 16, width // 16)
        for t in timesteps_for(scheduler, encoders.sample_sigmas, int(request.steps), latents.shape[1], device):
            sigma = t.expand(1).to(latents.dtype) / 1000
            pred = forward(transformer, latents, sigma, hidden, None, slots, cond_latents, grid, cond_grids)
            if negative is not None:
                neg = forward(transformer, latents, sigma, negative[0].to(device), None, negative[1].to(device),
                              cond_latents, grid, cond_grids)
                pred = neg + request.true_cfg * (pred - neg)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return decode(pipe, latents, height, width)
