"""2x2 packing of VAE latents into tokens and the FLUX image position ids ``(index, row, col)``.

Token order is row-major over the token grid ``(h, w) = (H/16, W/16)``, channels ``c * 4 + dy * 2 + dx``:
exactly ``FluxKontextPipeline._pack_latents`` / ``_unpack_latents``.

Ids (``kontext_image_ids``): the target's tokens carry index 0, the first control index 1 (as the pipeline
does), and each further control the next index (2, 3, ...), every image with its own ``(row, col)`` grid
starting at 0. So controls of any size may be mixed, and the rope sees them as separate "frames" of the
same scene; a spatial offset is not used.
"""

from __future__ import annotations

import torch

from qflux.plugin_api import Grid


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents (H, W even) -> [B, (H/2)*(W/2), C*4] tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[B, h*w, C*4] tokens on the token grid ``(h, w)`` -> [B, C, 2h, 2w] latents."""
    b, n, c4 = tokens.shape
    h, w = grid
    x = tokens.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def token_grid(height: int, width: int, vae_factor: int = 8) -> Grid:
    """Token grid of an image of ``height x width`` pixels."""
    return height // (vae_factor * 2), width // (vae_factor * 2)


def image_ids(grid: Grid, index: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """[h*w, 3] float ids ``(index, row, col)`` of one image's tokens."""
    h, w = grid
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def kontext_image_ids(
    grid: Grid, control_grids: list[Grid] | tuple[Grid, ...] = (), device: torch.device | str | None = None
) -> torch.Tensor:
    """[N + sum Nc_i, 3] ids of the sequence ``cat([target, control_1, control_2, ...])``: target index 0,
    control i (0-based) index i + 1."""
    parts = [image_ids(grid, 0, device)] + [image_ids(g, i + 1, device) for i, g in enumerate(control_grids)]
    return torch.cat(parts, dim=0)


def text_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[L, 3] zeros: FLUX gives text tokens no position in the image rope."""
    return torch.zeros(length, 3, device=device)
