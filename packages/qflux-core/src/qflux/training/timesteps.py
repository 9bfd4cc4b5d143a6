"""Sigma sampling for flow-matching training: ``x_t = (1 - sigma) x0 + sigma noise`` with sigma in (0, 1).

Sign convention: sigma is the noise level, drawn as ``sigmoid(logit_mean + logit_std * n)``, so a positive
``logit_mean`` means *more* noise (the SD3 paper's and musubi's convention). diffusers' example scripts draw
``u`` the same way but then index a descending schedule (sigma ~ 1 - u): their ``--logit_mean m`` is our
``logit_mean: -m``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qflux.config.schema import TrainConfig
from qflux.types import NoisyInput

EPS = 1e-4
RESOLUTION_SHIFT = "resolution_shift"


@dataclass(frozen=True)
class ShiftConstants:
    """A model's resolution-dependent shift, from its scheduler config: ``mu`` is linear in the image token
    count, ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (diffusers'
    ``calculate_shift``). The defaults are ``FlowMatchEulerDiscreteScheduler``'s (FLUX's values), used for
    keys a config lacks, exactly as diffusers does. ``shift_terminal`` (Qwen: 0.02) only stretches the end of
    the inference schedule; training sigmas are not stretched (nor are they in diffusers' or musubi's scripts)."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_shift_type: str = "exponential"  # "linear" exists in diffusers' scheduler too

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> ShiftConstants:
        defaults = cls()
        time_shift_type = str(config.get("time_shift_type") or defaults.time_shift_type)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"scheduler config: unknown time_shift_type {time_shift_type!r}")
        return cls(
            base_image_seq_len=int(config.get("base_image_seq_len") or defaults.base_image_seq_len),
            max_image_seq_len=int(config.get("max_image_seq_len") or defaults.max_image_seq_len),
            # `or` would turn an explicit 0.0 into the default: test for None instead
            base_shift=float(defaults.base_shift if config.get("base_shift") is None else config["base_shift"]),
            max_shift=float(defaults.max_shift if config.get("max_shift") is None else config["max_shift"]),
            time_shift_type=time_shift_type,
        )

    def mu(self, num_tokens: int) -> float:
        """diffusers' ``calculate_shift(num_tokens, base_seq_len, max_seq_len, base_shift, max_shift)``."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return num_tokens * slope + (self.base_shift - slope * self.base_image_seq_len)

    def apply(self, sigmas: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The scheduler's ``time_shift(mu, 1.0, sigmas)``."""
        mu = self.mu(num_tokens)
        inverse = 1.0 / sigmas.clamp(EPS, 1.0) - 1.0
        if self.time_shift_type == "linear":
            return mu / (mu + inverse)
        return math.exp(mu) / (math.exp(mu) + inverse)


def resolution_shift(num_tokens: int, constants: ShiftConstants) -> float:
    """``mu`` of the resolution-dependent shift for ``num_tokens`` target tokens."""
    return constants.mu(num_tokens)


def sample_sigmas(batch_size: int, num_tokens: int, train: TrainConfig, generator: torch.Generator,
                  shift: ShiftConstants | None = None) -> torch.Tensor:
    """[B] sigmas by ``train.timestep_sampling``:

    uniform           u ~ U(0, 1)
    logit_normal      sigmoid(logit_mean + logit_std * n), n ~ N(0, 1)
    sigmoid           sigmoid(logit_std * n) (centred logit-normal)
    shift             u ~ U(0, 1) then ``shift * u / (1 + (shift - 1) u)`` (SD3 fixed shift)
    resolution_shift  logit-normal then the model scheduler's shift with ``mu`` from the token count;
                      ``shift`` holds the model's constants (``flux_shift`` is its old name)
    """
    scheme = train.timestep_sampling
    if scheme == "uniform":
        sigmas = torch.rand(batch_size, generator=generator)
    elif scheme in ("logit_normal", RESOLUTION_SHIFT):
        sigmas = torch.sigmoid(train.logit_mean + train.logit_std * torch.randn(batch_size, generator=generator))
        if scheme == RESOLUTION_SHIFT:
            if shift is None:  # FLUX's constants as a silent default would be wrong for every other model
                raise ValueError("timestep_sampling resolution_shift needs the model's ShiftConstants")
            sigmas = shift.apply(sigmas, num_tokens)
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
