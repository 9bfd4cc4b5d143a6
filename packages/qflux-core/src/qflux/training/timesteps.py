"""Sigma sampling for flow-matching training: ``x_t = (1 - sigma) x0 + sigma noise`` with sigma in (0, 1)."""

from __future__ import annotations

import math

import torch

from qflux.config.schema import TrainConfig
from qflux.types import NoisyInput

EPS = 1e-4


def resolution_shift(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` of the resolution-dependent shift, linear in the token count (FLUX's ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return num_tokens * slope + (base_shift - slope * base_tokens)


def sample_sigmas(batch_size: int, num_tokens: int, train: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """[B] sigmas by ``train.timestep_sampling``:

    uniform       u ~ U(0, 1)
    logit_normal  sigmoid(logit_mean + logit_std * n), n ~ N(0, 1)
    sigmoid       sigmoid(logit_std * n) (centred logit-normal)
    shift         u ~ U(0, 1) then ``shift * u / (1 + (shift - 1) u)`` (SD3 fixed shift)
    flux_shift    logit-normal then the exponential shift with ``mu`` from the token count (FLUX)
    """
    scheme = train.timestep_sampling
    if scheme == "uniform":
        sigmas = torch.rand(batch_size, generator=generator)
    elif scheme in ("logit_normal", "flux_shift"):
        sigmas = torch.sigmoid(train.logit_mean + train.logit_std * torch.randn(batch_size, generator=generator))
        if scheme == "flux_shift":
            mu = resolution_shift(num_tokens)
            sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas.clamp(EPS, 1.0) - 1.0))
    elif scheme == "sigmoid":
        sigmas = torch.sigmoid(train.logit_std * torch.randn(batch_size, generator=generator))
    elif scheme == "shift":
        u = torch.rand(batch_size, generator=generator)
        sigmas = train.shift * u / (1.0 + (train.shift - 1.0) * u)
    else:  # the schema's Literal makes this unreachable from a config
        raise ValueError(f"unknown timestep sampling {scheme!r}")
    return sigmas.clamp(EPS, 1.0 - EPS)


def add_noise(latents: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> NoisyInput:
    """latents, noise [B, N, C]; sigmas [B] -> the noised input and the velocity target ``noise - x0``."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return NoisyInput(latents=(1.0 - s) * latents + s * noise, sigmas=sigmas, target=noise - latents)
