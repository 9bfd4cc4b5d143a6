"""One training forward: noise the target, ``Trainer.predict``, the ``qflux_loss`` hook."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from qflux.config.schema import QfluxConfig
from qflux.trainer import Trainer
from qflux.training.batching import collate
from qflux.training.timesteps import ShiftConstants, add_noise, sample_sigmas
from qflux.types import Batch, EncodedSample, NoisyInput

VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def loss_of(hook: Any, prediction: torch.Tensor, noisy: NoisyInput, batch: Batch, config: QfluxConfig) -> torch.Tensor:
    return hook.qflux_loss(prediction=prediction, noisy=noisy, batch=batch, loss=config.loss)


def sample_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """The random stream of one sample in one epoch (caption dropout, sigma, noise).

    A function of (seed, epoch, sample) only: the same sample gets the same noise whatever the batch size,
    the process count or an interruption, so 2 processes x batch 1 equal 1 process x batch 2 and a resumed
    run equals an uninterrupted one without saving RNG state.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def apply_caption_dropout(samples: list[EncodedSample], p: float,
                          generators: list[torch.Generator]) -> list[EncodedSample]:
    """Swap each sample's prompt for its empty-prompt encoding with probability ``p`` (its own stream)."""
    if p <= 0:
        return samples
    out = []
    for s, generator in zip(samples, generators):
        drop = float(torch.rand((), generator=generator)) < p
        out.append(replace(s, prompt=s.empty_prompt) if drop and s.empty_prompt is not None else s)
    return out


def make_batch(samples: list[EncodedSample], config: QfluxConfig, epoch: int, device: Any,
               dtype: torch.dtype) -> tuple[Batch, list[torch.Generator]]:
    """The micro-batch on the device and its samples' random streams (dropout already drawn from them)."""
    generators = [sample_generator(config.train.seed, epoch, s.key) for s in samples]
    samples = apply_caption_dropout(samples, config.data.caption_dropout, generators)
    return collate(samples).to(device, dtype), generators


def training_loss(hook: Any, trainer: Trainer, transformer: torch.nn.Module, batch: Batch,
                  config: QfluxConfig, generators: list[torch.Generator],
                  shift: ShiftConstants | None = None) -> torch.Tensor:
    """Loss of one micro-batch (already on the device); ``generators[i]`` (CPU) draws sample i's sigma and
    noise, so a run is reproducible whatever the device. ``shift``: the model's constants for
    ``timestep_sampling: resolution_shift`` (read once per run, ``shift_source.model_shift``)."""
    latents = batch.latents
    num_tokens = latents.shape[1]
    sigmas = torch.cat([sample_sigmas(1, num_tokens, config.train, g, shift) for g in generators]).to(latents.device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    noisy = add_noise(latents, sigmas, noise.to(latents.device, latents.dtype))
    return loss_of(hook, trainer.predict(transformer, batch, noisy, config.model), noisy, batch, config)


@torch.no_grad()
def validation_loss_sum(hook: Any, trainer: Trainer, transformer: torch.nn.Module, batches: list[Batch],
                        config: QfluxConfig, seed: int) -> tuple[float, int]:
    """(sum of losses, count) over held-out batches at fixed sigmas with fixed per-sample noise: the mean is
    comparable between steps and does not depend on how batches are split across processes."""
    total, count = 0.0, 0
    for batch in batches:
        latents = batch.latents
        generators = [sample_generator(seed, -1, key) for key in batch.keys]
        for sigma in VALIDATION_SIGMAS:
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
            sigmas = torch.full((latents.shape[0],), sigma, device=latents.device)
            noisy = add_noise(latents, sigmas, noise.to(latents.device, latents.dtype))
            loss = loss_of(hook, trainer.predict(transformer, batch, noisy, config.model), noisy, batch, config)
            total += float(loss) * latents.shape[0]
            count += latents.shape[0]
    return total, count


def micro_step(accelerator: Any, hook: Any, trainer: Trainer, transformer: torch.nn.Module, batch: Batch,
               config: QfluxConfig, generators: list[torch.Generator], params: list[torch.nn.Parameter],
               optimizer: torch.optim.Optimizer,
               grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
               loss_scale: float = 1.0, shift: ShiftConstants | None = None) -> float:
    """One micro-batch of the training loop: loss, backward, and (when the accumulation is complete)
    clipping and the optimizer step. Returns the loss; a non-finite loss is returned before any backward
    or step, so the caller can stop with the weights untouched. ``grad_sync`` averages the gradients across
    processes when no DDP wrapper does (``train.fsdp``), once per optimizer step, before clipping.
    ``loss_scale`` weighs this process's share of a short global batch (``batching.rank_batches``); the
    returned loss is the unscaled mean of the micro-batch."""
    with accelerator.accumulate(transformer), accelerator.autocast():
        loss = training_loss(hook, trainer, transformer, batch, config, generators, shift)
        value = float(loss.detach())
        if accelerator.num_processes > 1:  # every rank must agree before the backward's all-reduce
            bad = accelerator.reduce(torch.tensor([0.0 if math.isfinite(value) else 1.0], device=loss.device),
                                     reduction="sum")
            if float(bad) > 0:
                return math.nan if math.isfinite(value) else value
        if not math.isfinite(value):
            return value
        accelerator.backward(loss if loss_scale == 1.0 else loss * loss_scale)
        if accelerator.sync_gradients and grad_sync is not None:
            grad_sync(params)
        if accelerator.sync_gradients and config.train.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return value
