"""Flow-matching loss with edit-mask weighting (DESIGN section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_to_tokens(mask: torch.Tensor, vae_factor: int = 8, patch: int = 2) -> torch.Tensor:
    """Pixel mask [..., H, W] in [0, 1] -> token mask [..., (H/16)*(W/16)] (row-major, like 2x2 packing).

    Average-pool over the VAE factor (fraction of each latent pixel that is edited), then take the max over
    each packing patch: a token counts as edited as much as its most edited latent pixel.
    """
    lead = mask.shape[:-2]
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    x = F.avg_pool2d(x, vae_factor)
    x = F.max_pool2d(x, patch)
    return x.reshape(*lead, -1)


def flow_matching_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    foreground: float = 1.0,
    background: float = 1.0,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over tokens and channels of ``w * (prediction - target)^2``, then mean over the batch.

    prediction, target: [B, N, C]; mask: [B, N] in [0, 1] or None (w = 1); w = fg * m + bg * (1 - m).
    ``masked`` [B] bool (optional): samples flagged False have no edit mask and weigh 1 everywhere.
    Computed in float32 whatever the compute dtype.
    """
    per_token = (prediction.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
    if mask is not None:
        m = mask.to(per_token.dtype)
        weight = foreground * m + background * (1.0 - m)
        if masked is not None:
            weight = torch.where(masked.to(weight.device)[:, None], weight, torch.ones_like(weight))
        per_token = per_token * weight
    return per_token.mean(dim=-1).mean()
