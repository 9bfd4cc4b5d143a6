"""Group encoded samples into batches of equal signature and stack them (``collate``).

Samples of different target size or control layout never share a batch (aspect buckets), so image tokens
are never padded; prompts of different length are right-padded and masked.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch

from qflux.types import Batch, EncodedSample, PromptEmbeds


def collate(samples: Sequence[EncodedSample]) -> Batch:
    """Stack samples of one signature: latents [B, N, C], prompt hidden [B, L_max, D] + mask [B, L_max]."""
    first = samples[0]
    if any(s.signature != first.signature for s in samples):
        raise ValueError("collate() needs samples of one signature (target grid and control grids)")
    masks = [s.mask for s in samples]
    masked = None
    if any(m is None for m in masks) and not all(m is None for m in masks):
        # Mixed batch: unmasked samples get a placeholder mask and a False flag, so the loss weighs them 1
        # exactly as it would in a batch of their own.
        masked = torch.tensor([m is not None for m in masks])
        masks = [m if m is not None else torch.zeros(s.latents.shape[0]) for m, s in zip(masks, samples)]
    return Batch(
        keys=[s.key for s in samples],
        latents=torch.stack([s.latents for s in samples]),
        grid=first.grid,
        prompt=stack_prompts([s.prompt for s in samples]),
        controls=[torch.stack([s.controls[i] for s in samples]) for i in range(len(first.controls))],
        control_grids=list(first.control_grids),
        mask=None if masks[0] is None else torch.stack([m.float() for m in masks]),
        masked=masked,
    )


def stack_prompts(prompts: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """Right-pad hidden states [L_i, D] to the longest and build the [B, L] mask (1 = token)."""
    lengths = [p.hidden.shape[0] for p in prompts]
    longest = max(lengths)
    hidden = prompts[0].hidden.new_zeros(len(prompts), longest, prompts[0].hidden.shape[-1])
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        hidden[i, : lengths[i]] = p.hidden
        mask[i, : lengths[i]] = p.mask.long() if p.mask is not None else 1
    has_mask = any(p.mask is not None for p in prompts) or len(set(lengths)) > 1
    pooled = torch.stack([p.pooled for p in prompts]) if prompts[0].pooled is not None else None
    return PromptEmbeds(hidden=hidden, mask=mask if has_mask else None, pooled=pooled)


class BucketBatchSampler:
    """Yields lists of sample indices; each list holds samples of one signature.

    One epoch: shuffle within each bucket, cut into batches of ``batch_size`` (a bucket's remainder forms
    a smaller batch, so every sample is seen once per epoch), shuffle the batches. Deterministic for a seed
    and epoch, so a resumed run replays the same order.
    """

    def __init__(self, signatures: Sequence[object], batch_size: int, seed: int) -> None:
        self.buckets: dict[object, list[int]] = defaultdict(list)
        for index, signature in enumerate(signatures):
            self.buckets[signature].append(index)
        self.batch_size = batch_size
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for signature in sorted(self.buckets, key=repr):
            indices = list(self.buckets[signature])
            rng.shuffle(indices)
            batches.extend(indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size))
        rng.shuffle(batches)
        return batches
