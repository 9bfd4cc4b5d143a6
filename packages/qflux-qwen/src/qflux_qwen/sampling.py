"""``Trainer.sample`` for the Qwen trainers: one image with the current (LoRA) transformer.

The denoising loop is the one of ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline.__call__`` (same
sigmas ``linspace(1, 1/steps)``, dynamic shift ``mu`` from the target's token count, Euler steps of a FRESH
``FlowMatchEulerDiscreteScheduler`` built from the model's scheduler config, true CFG with the pipelines'
norm rescale, VAE decode after un-normalising), written out with the pipeline's own helpers
(``prepare_latents``, ``_unpack_latents``, ``image_processor``) because ``__call__`` resizes every control
itself: here the controls (and ``request.vl_controls``, the VL encoder's copies) are encoded at the size they
are given, exactly as ``Trainer.encode`` encodes training samples; the data stage planned them with the pipeline's
own rule (``TrainerInfo.condition_sizing``) unless the config chose cheaper sizes. The output has the
requested size (sides rounded down to multiples of 16, as the pipelines do). No control: text-to-image with the same system prompt.
Latents stay float32 between steps; noise comes from a CPU generator seeded with ``request.seed``, so an
image depends on the seed only, whatever the device.

Encoders never beside the transformer: ``encode_request`` (``Trainer.encode_request``) runs the encoder half
before the transformer loads (the prompt and, with true CFG, the negative prompt through Qwen2.5-VL with the
controls; each control through the VAE encoder), ``decoder`` keeps the VAE and the scheduler config only, and
``sample(..., encoded=...)`` denoises and decodes from them. A raw request is encoded first with the whole
encoders, so both ways give the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from qflux.plugin_api import UserError, device_of, eval_mode, flow_match_timesteps, unwrap
from qflux_qwen.encoding import check_size, encode_image, encode_prompt
from qflux_qwen.predict import check_zero_cond_t, forward
from qflux_qwen.variants import QwenVariant

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from qflux.plugin_api import Grid, ModelBundle, ModelConfig, SampleRequest
    from qflux_qwen.encoders import QwenEncoders


@dataclass
class QwenEncoded:
    """``encode_request``'s result, tensors on CPU: prompt ``hidden`` [1, L, D] and ``mask`` [1, L] (the
    negative prompt's too, true CFG only), and each control's packed normalised latents [1, N, C] and grid."""

    hidden: torch.Tensor
    mask: torch.Tensor
    neg_hidden: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None
    controls: list[torch.Tensor] = field(default_factory=list)
    control_grids: list[Grid] = field(default_factory=list)


def _check(variant: QwenVariant, request: SampleRequest) -> tuple[int, int]:
    if len(request.controls) > variant.max_controls:
        raise UserError(
            f"{len(request.controls)} control images given; the {variant.name} trainer takes at most "
            f"{variant.max_controls}"
        )
    for i, control in enumerate(request.controls):
        check_size(control, f"control {i}", "sample request")
    if request.steps < 1:
        raise UserError(f"sampling needs at least 1 step, got {request.steps}")
    height, width = request.height // 16 * 16, request.width // 16 * 16
    if height < 16 or width < 16:
        raise UserError(f"sample size {request.width}x{request.height} is too small (at least 16x16)")
    return height, width


def _encoders(variant: QwenVariant, bundle: ModelBundle) -> QwenEncoders:
    if bundle.encoders is None:  # validation with a complete cache: load lazily, keep for the next call
        from qflux_qwen.loading import load_encoders

        bundle.encoders = load_encoders(variant, bundle.model)
    return bundle.encoders


def fresh_scheduler(config: dict[str, Any], steps: int) -> Any:
    """A new ``FlowMatchEulerDiscreteScheduler`` from the model's config. One step: without ``shift_terminal``
    (stretching a single sigma to the terminal value divides 0 by 0 in diffusers 0.42: NaN images)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps == 1 and config.get("shift_terminal"):
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift_terminal=None)
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def decode(pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image:
    """Packed normalised latents [1, N, C] -> PIL image (the pipelines' decode)."""
    vae = pipe.vae
    z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(device_of(vae), vae.dtype)
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    image = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


@torch.no_grad()
def encode_request(variant: QwenVariant, encoders: QwenEncoders, request: SampleRequest,
                   model: ModelConfig) -> QwenEncoded:
    """``Trainer.encode_request``: the prompts (with the controls and ``request.vl_controls``) and the controls,
    encoded as ``sample`` encodes them, moved to the CPU."""
    _check(variant, request)
    pipe = encoders.pipeline(variant.pipeline_class_name)
    pipelines = {variant.pipeline_class_name: pipe}
    controls = [c.convert("RGB") for c in request.controls]
    vl = [c.convert("RGB") for c in request.vl_controls]
    max_len = model.max_sequence_length
    hidden, mask = encode_prompt(variant, encoders, request.prompt, controls, max_len, pipelines, vl)
    encoded = QwenEncoded(hidden.cpu(), mask.cpu())
    if request.true_cfg > 1.0:
        neg_hidden, neg_mask = encode_prompt(variant, encoders, request.negative_prompt, controls, max_len,
                                             pipelines, vl)
        encoded.neg_hidden, encoded.neg_mask = neg_hidden.cpu(), neg_mask.cpu()
    for control in controls:
        packed, grid = encode_image(encoders, control, pipe)
        encoded.controls.append(packed.cpu())
        encoded.control_grids.append(grid)
    return encoded


def decoder(encoders: QwenEncoders) -> QwenEncoders:
    """``Trainer.decoder``: the VAE and the scheduler config, without the text encoder, tokenizer and processor."""
    return replace(encoders, text_encoder=None, tokenizer=None, processor=None)


@torch.no_grad()
def sample(variant: QwenVariant, bundle: ModelBundle, request: SampleRequest,
           encoded: QwenEncoded | None = None) -> Image:
    """``Trainer.sample``. ``encoded``: ``encode_request``'s (``bundle.encoders`` may then be ``decoder``'s);
    None: the request is encoded here with the encoders (loaded when the bundle has none)."""
    height, width = _check(variant, request)
    encoders = _encoders(variant, bundle)
    transformer = bundle.transformer
    check_zero_cond_t(variant, transformer)
    if encoded is None:
        encoded = encode_request(variant, encoders, request, bundle.model)
    do_cfg = request.true_cfg > 1.0
    if do_cfg and encoded.neg_hidden is None:
        raise ValueError("the request was encoded without its negative prompt (true_cfg <= 1 then)")
    device = device_of(transformer)
    scheduler = fresh_scheduler(encoders.scheduler_config, request.steps)
    pipe = encoders.pipeline(variant.pipeline_class_name, transformer=unwrap(transformer), scheduler=scheduler)

    with eval_mode(transformer):
        hidden, mask = encoded.hidden.to(device), encoded.mask.to(device)
        if do_cfg:
            neg_hidden, neg_mask = encoded.neg_hidden.to(device), encoded.neg_mask.to(device)
        control_latents = [packed.to(device, torch.float32) for packed in encoded.controls]
        control_grids = list(encoded.control_grids)

        generator = torch.Generator("cpu").manual_seed(int(request.seed))
        channels = unwrap(transformer).config.in_channels // 4
        latents, _ = pipe.prepare_latents(None, 1, channels, height, width, torch.float32, torch.device("cpu"), generator)
        latents = latents.to(device)
        grid = (height // 16, width // 16)

        timesteps = flow_match_timesteps(scheduler, int(request.steps), latents.shape[1], device)
        for t in timesteps:
            sigma = (t / 1000).expand(1).to(device)
            pred = forward(transformer, latents, sigma, hidden, mask, control_latents, grid, control_grids).float()
            if do_cfg:
                neg = forward(
                    transformer, latents, sigma, neg_hidden, neg_mask, control_latents, grid, control_grids
                ).float()
                combined = neg + request.true_cfg * (pred - neg)
                pred = combined * (torch.norm(pred, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
            latents = scheduler.step(pred, t, latents, return_dict=False)[0].float()

    return decode(pipe, latents, height, width)
