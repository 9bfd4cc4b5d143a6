"""One training forward: noise the target, predict through the trainer's hook, compute the loss hook."""

from __future__ import annotations

from typing import Any

import torch

from qflux.config.schema import QfluxConfig
from qflux.training.timesteps import add_noise, sample_sigmas
from qflux.types import Batch, NoisyInput, TrainerInfo

VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def predict(hook: Any, trainer: TrainerInfo, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
            config: QfluxConfig) -> torch.Tensor:
    prediction = hook.qflux_predict(trainer=trainer, transformer=transformer, batch=batch, noisy=noisy,
                                    model=config.model)
    if prediction is None:
        raise RuntimeError(f"no plugin implements qflux_predict for trainer '{trainer.name}'")
    return prediction


def loss_of(hook: Any, prediction: torch.Tensor, noisy: NoisyInput, batch: Batch, config: QfluxConfig) -> torch.Tensor:
    return hook.qflux_loss(prediction=prediction, noisy=noisy, batch=batch, loss=config.loss)


def training_loss(hook: Any, trainer: TrainerInfo, transformer: torch.nn.Module, batch: Batch,
                  config: QfluxConfig, generator: torch.Generator) -> torch.Tensor:
    """Loss of one micro-batch (already on the device). Noise and sigmas come from ``generator`` (CPU) so
    a run is reproducible whatever the device."""
    latents = batch.latents
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    sigmas = sample_sigmas(latents.shape[0], latents.shape[1], config.train, generator).to(latents.device)
    noisy = add_noise(latents, sigmas, noise)
    return loss_of(hook, predict(hook, trainer, transformer, batch, noisy, config), noisy, batch, config)


@torch.no_grad()
def validation_loss(hook: Any, trainer: TrainerInfo, transformer: torch.nn.Module, batches: list[Batch],
                    config: QfluxConfig, seed: int) -> float:
    """Mean loss over held-out batches at fixed sigmas and fixed noise: comparable between steps."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        latents = batch.latents
        for sigma in VALIDATION_SIGMAS:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
            sigmas = torch.full((latents.shape[0],), sigma, device=latents.device)
            noisy = add_noise(latents, sigmas, noise)
            loss = loss_of(hook, predict(hook, trainer, transformer, batch, noisy, config), noisy, batch, config)
            total += float(loss) * latents.shape[0]
            count += latents.shape[0]
    return total / max(count, 1)
