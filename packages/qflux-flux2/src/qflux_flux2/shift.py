"""FLUX.2's timestep shift for ``train.timestep_sampling: resolution_shift``: the pipelines' empirical mu.

The FLUX.2 pipelines do not use the scheduler config's linear ``calculate_shift``: they pass
``mu = compute_empirical_mu(image_seq_len, num_steps)`` (a fit by Black Forest Labs) to the scheduler, whose
exponential time shift then maps each sigma to ``exp(mu) / (exp(mu) + 1 / sigma - 1)``. Training with the same
shift puts the training sigmas where inference spends its steps at that resolution. ``mu`` also depends on the
step count; ``model.options.shift_steps`` (50, the pipelines' default) says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class EmpiricalMuShift:
    """``Trainer.shift_rule`` of the FLUX.2 trainers (``apply`` and ``describe``, as the core calls them)."""

    steps: int = 50

    def mu(self, num_tokens: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=num_tokens, num_steps=self.steps)

    def apply(self, sigmas: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The scheduler's exponential ``time_shift(mu, 1.0, sigmas)`` with the empirical mu."""
        e = math.exp(self.mu(num_tokens))
        return e / (e + (1 / sigmas - 1))

    def describe(self) -> str:
        return (f"timestep shift: FLUX.2's empirical mu (compute_empirical_mu at {self.steps} steps; "
                f"mu {self.mu(1024):.3f} at 1024 tokens, {self.mu(4096):.3f} at 4096)")
