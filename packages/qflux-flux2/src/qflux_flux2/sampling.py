"""``Trainer.sample`` for the FLUX.2 trainers: one image with the current (LoRA) transformer.

The denoising loop of ``Flux2Pipeline`` / ``Flux2KleinPipeline.__call__``, written out with the pipelines' own
helpers (prompt encoding, ``prepare_latents``, reference preparation, ``_unpack_latents_with_ids``,
``_unpatchify_latents``, VAE batch-norm statistics) so that the current transformer is used as it is and
nothing is copied: sigmas ``linspace(1, 1/steps)``, ``mu = compute_empirical_mu(target tokens, steps)``, Euler
steps of a FRESH ``FlowMatchEulerDiscreteScheduler`` built from the model's scheduler config, then the decode.

Guidance, as the pipelines do it:

- flux2-dev: the guidance embedding gets ``request.guidance`` (None: ``model.options.sample_guidance``, 4.0 like
  ``Flux2Pipeline``); ``request.true_cfg > 1`` additionally runs true CFG against ``request.negative_prompt``
  (something the pipeline does not offer; off by default).
- flux2-klein: true CFG against the empty prompt (``request.negative_prompt``, "" by default as in the pipeline)
  with scale ``request.guidance`` (None: ``sample_guidance``, 4.0); on when the scale is > 1 and the checkpoint
  is not step-distilled (``is_distilled`` in ``model_index.json``), as ``do_classifier_free_guidance`` says.

Latents stay float32 between steps; noise comes from a CPU generator seeded with ``request.seed``, so an image
depends on the seed only, whatever the device. The output has the requested size, sides floored to 16.

Encoders never beside the transformer: ``encode_request`` (``Trainer.encode_request``) runs the encoder half
before the transformer loads (the prompt and, when CFG is on, the negative prompt; each reference through the
VAE encoder), ``decoder`` keeps the VAE and the scheduler config only, and ``sample(..., encoded=...)`` denoises
and decodes from them. A raw request is encoded first with the whole encoders, so both ways give the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from qflux.plugin_api import UserError, device_of, eval_mode, unwrap
from qflux_flux2.encoding import check_reference, encode_pixels, encode_prompt, reference_pixels, sequence_length
from qflux_flux2.options import Flux2Options
from qflux_flux2.predict import forward
from qflux_flux2.variants import MULTIPLE, Flux2Variant

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import Grid, ModelBundle, ModelConfig, SampleRequest
    from qflux_flux2.encoders import Flux2Encoders


@dataclass
class Flux2Encoded:
    """``encode_request``'s result, tensors on CPU: the prompt embeddings [1, L, 3D], the negative prompt's when
    CFG is on (``cfg_scale`` > 1), each reference's packed normalised latents [1, N, 128] and grid."""

    prompt: torch.Tensor
    negative: torch.Tensor | None = None
    references: list[torch.Tensor] = field(default_factory=list)
    reference_grids: list[Grid] = field(default_factory=list)


def _size(variant: Flux2Variant, request: SampleRequest) -> tuple[int, int]:
    if len(request.controls) > variant.info.max_controls:
        raise UserError(f"{len(request.controls)} reference images given; the {variant.name} trainer takes at most "
                        f"{variant.info.max_controls}")
    for i, control in enumerate(request.controls):
        check_reference(control, f"reference {i}", "sample request")
    if request.steps < 1:
        raise UserError(f"sampling needs at least 1 step, got {request.steps}")
    height, width = request.height // MULTIPLE * MULTIPLE, request.width // MULTIPLE * MULTIPLE
    if height < MULTIPLE or width < MULTIPLE:
        raise UserError(f"sample size {request.width}x{request.height} is too small (at least 16x16)")
    return height, width


def _encoders(variant: Flux2Variant, bundle: ModelBundle) -> Flux2Encoders:
    if bundle.encoders is None:  # validation with a complete cache: load lazily, keep for the next call
        from qflux_flux2.loading import load_encoders

        bundle.encoders = load_encoders(variant, bundle.model)
    return bundle.encoders


def timesteps_for(scheduler: Any, steps: int, image_seq_len: int, device: Any) -> torch.Tensor:
    """The pipelines' schedule: sigmas ``linspace(1, 1/steps)`` shifted by the empirical ``mu``."""
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


def decode(pipe: Any, latents: torch.Tensor, latent_ids: torch.Tensor) -> Image:
    """Packed normalised latents [1, N, 128] -> PIL image (the pipelines' decode)."""
    vae = pipe.vae
    z = pipe._unpack_latents_with_ids(latents, latent_ids)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    z = pipe._unpatchify_latents(z * std + mean).to(device_of(vae), vae.dtype)
    image = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def cfg_scale(variant: Flux2Variant, bundle: ModelBundle, request: SampleRequest, guidance: float) -> float:
    """The true-CFG scale of this request (1.0: off), see the module docstring."""
    return _cfg_scale(variant, bundle.model, request, guidance)


def _cfg_scale(variant: Flux2Variant, model: ModelConfig, request: SampleRequest, guidance: float) -> float:
    if variant.guidance_embeds:
        return request.true_cfg
    from qflux_flux2.loading import model_index

    return 1.0 if model_index(model).get("is_distilled", False) else guidance


def _guidance(model: ModelConfig, request: SampleRequest) -> float:
    return Flux2Options.model_validate(model.options).sample_guidance if request.guidance is None \
        else float(request.guidance)


@torch.no_grad()
def encode_request(variant: Flux2Variant, encoders: Flux2Encoders, request: SampleRequest,
                   model: ModelConfig) -> Flux2Encoded:
    """``Trainer.encode_request``: the prompt (and the negative prompt when CFG is on) and the references,
    encoded as ``sample`` encodes them, moved to the CPU."""
    _size(variant, request)
    pipe = encoders.pipeline()
    length = sequence_length(model)
    scale = _cfg_scale(variant, model, request, _guidance(model, request))
    encoded = Flux2Encoded(encode_prompt(variant, encoders, request.prompt, length, pipe).cpu())
    if scale > 1:
        encoded.negative = encode_prompt(variant, encoders, request.negative_prompt, length, pipe).cpu()
    for control in request.controls:
        packed, grid = encode_pixels(encoders, reference_pixels(pipe, control), pipe)
        encoded.references.append(packed.cpu())
        encoded.reference_grids.append(grid)
    return encoded


def decoder(encoders: Flux2Encoders) -> Flux2Encoders:
    """``Trainer.decoder``: the VAE and the scheduler config, without the text encoder and tokenizer."""
    return replace(encoders, text_encoder=None, tokenizer=None)


@torch.no_grad()
def sample(variant: Flux2Variant, bundle: ModelBundle, request: SampleRequest,
           encoded: Flux2Encoded | None = None) -> Image:
    """``Trainer.sample``. ``encoded``: ``encode_request``'s (``bundle.encoders`` may then be ``decoder``'s);
    None: the request is encoded here with the encoders (loaded when the bundle has none)."""
    height, width = _size(variant, request)
    guidance = _guidance(bundle.model, request)
    encoders = _encoders(variant, bundle)
    if encoded is None:
        encoded = encode_request(variant, encoders, request, bundle.model)
    transformer = bundle.transformer
    device = device_of(transformer)
    from qflux_flux2.loading import fresh_scheduler

    scheduler = fresh_scheduler(encoders.scheduler_config)
    pipe = encoders.pipeline(transformer=unwrap(transformer), scheduler=scheduler)
    scale = cfg_scale(variant, bundle, request, guidance)
    if scale > 1 and encoded.negative is None:
        raise ValueError("the request was encoded without its negative prompt (CFG was off then)")
    embedded = guidance if variant.guidance_embeds else None

    with eval_mode(transformer):
        prompt = encoded.prompt.to(device)
        negative = encoded.negative.to(device) if scale > 1 else None
        references = [packed.to(device) for packed in encoded.references]
        reference_grids = list(encoded.reference_grids)

        generator = torch.Generator("cpu").manual_seed(int(request.seed))
        channels = unwrap(transformer).config.in_channels // 4
        latents, latent_ids = pipe.prepare_latents(1, channels, height, width, prompt.dtype, torch.device("cpu"),
                                                   generator)
        latents = latents.to(device)
        grid = (height // MULTIPLE, width // MULTIPLE)
        for t in timesteps_for(scheduler, int(request.steps), latents.shape[1], device):
            sigma = t.expand(1).to(latents.dtype) / 1000
            pred = forward(transformer, latents, sigma, prompt, references, grid, reference_grids, embedded)
            if negative is not None:
                neg = forward(transformer, latents, sigma, negative, references, grid, reference_grids, embedded)
                pred = neg + scale * (pred - neg)
            latents = scheduler.step(pred.to(latents.dtype), t, latents, return_dict=False)[0]
    return decode(pipe, latents, latent_ids.to(latents.device))
