"""Group encoded samples into batches of equal target grid and stack them (``collate``).

Samples of different target size never share a batch (aspect buckets), so image tokens are never padded;
prompts of different length are right-padded and masked. Samples of one target grid but different control
layouts (count or sizes of the reference images) do share one: such a batch keeps its controls per sample
and runs one forward per layout (``Batch.layout_groups``, ``qflux.training.step.predict``), so a dataset
whose samples carry 0, 1 or 3 references, or reference dropout, still trains in full batches.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qflux.types import Batch, EncodedSample, PromptEmbeds


def collate(samples: Sequence[EncodedSample]) -> Batch:
    """Stack samples of one target grid: latents [B, N, C], prompt hidden [B, L_max, D] + mask [B, L_max].

    Controls: stacked [B, Nc_i, C] when every sample has the same control layout; otherwise kept per sample
    (``Batch.sample_controls``, ``Batch.controls`` empty): a mixed batch."""
    first = samples[0]
    if any(s.grid != first.grid for s in samples):
        raise ValueError("collate() needs samples of one target grid")
    uniform = all(s.signature[1] == first.signature[1] for s in samples)
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
        controls=[torch.stack([s.controls[i] for s in samples]) for i in range(len(first.controls))] if uniform else [],
        control_grids=list(first.control_grids) if uniform else [],
        mask=None if masks[0] is None else torch.stack([m.float() for m in masks]),
        masked=masked,
        sample_controls=None if uniform else [list(s.controls) for s in samples],
        sample_control_grids=None if uniform else [list(s.control_grids) for s in samples],
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
    slots = None
    if prompts[0].image_slots is not None:  # padding is never an image slot
        slots = torch.zeros(len(prompts), longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            slots[i, : lengths[i]] = p.image_slots
    return PromptEmbeds(hidden=hidden, mask=mask if has_mask else None, pooled=pooled, image_slots=slots)


class BucketBatchSampler:
    """Yields lists of sample indices; each list holds samples of one target grid (a bucket).

    ``signatures``: each sample's ``EncodedSample.signature`` (target grid, control grids); only the target
    grid keys the bucket, so samples that differ in control layout share batches (``collate`` keeps their
    controls apart). One epoch: shuffle within each bucket, cut into batches of ``batch_size`` (a bucket's
    remainder forms a smaller batch, so every sample is seen once per epoch), shuffle the batches.
    Deterministic for a seed and epoch, so a resumed run replays the same order.
    """

    def __init__(self, signatures: Sequence[Sequence[object]], batch_size: int, seed: int) -> None:
        self.buckets: dict[object, list[int]] = defaultdict(list)
        for index, signature in enumerate(signatures):
            self.buckets[signature[0]].append(index)
        self.batch_size = batch_size
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for grid in sorted(self.buckets, key=repr):
            indices = list(self.buckets[grid])
            rng.shuffle(indices)
            batches.extend(indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size))
        rng.shuffle(batches)
        return batches


@dataclass(frozen=True)
class RankBatch:
    """One process's micro-batch: sample indices and the factor its mean loss is scaled by, so that the
    average over processes (what the gradient all-reduce computes) weighs every sample of the global batch
    equally. 1.0 except in a bucket's short last global batch; 0.0 for a placeholder (see ``rank_batches``)."""

    indices: list[int]
    loss_scale: float = 1.0


def rank_batches(sampler: BucketBatchSampler, epoch: int, rank: int, world: int) -> list[RankBatch]:
    """Process ``rank``'s micro-batches of one epoch.

    The sampler cuts global batches of ``batch_size * world`` samples of one target grid; rank r takes the r-th
    slice of each, so the optimizer sees the same global batches whatever the process count. A bucket's short
    last global batch of n samples is split as evenly as the count allows (slices differ by at most one), each
    slice's loss scaled by ``len(slice) * world / n``: the mean over processes is then the mean over the n
    samples, as one process would compute it. When n < world, the processes left without a sample run the
    batch's first sample with scale 0: every process runs the same number of micro-batches (collectives never
    wait on a missing rank), and each sample is counted once per epoch.
    """
    mine = []
    for global_batch in sampler.epoch(epoch):
        n = len(global_batch)
        size, extra = divmod(n, world)
        start = rank * size + min(rank, extra)
        indices = global_batch[start : start + size + (1 if rank < extra else 0)]
        if not indices:
            mine.append(RankBatch([global_batch[0]], 0.0))
        else:
            mine.append(RankBatch(indices, len(indices) * world / n))  # exactly 1.0 for a full global batch
    return mine
