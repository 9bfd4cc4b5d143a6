"""Sigma sampling schemes, noising, and batching by target grid."""

import pytest
import torch

from qflux.config.schema import TrainConfig
from qflux.training.batching import BucketBatchSampler, collate, rank_batches, stack_prompts
from qflux.training.timesteps import ShiftConstants, add_noise, resolution_shift, sample_sigmas
from qflux.types import EncodedSample, PromptEmbeds


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "sigmoid", "shift", "resolution_shift"])
def test_sigmas_in_open_unit_interval_and_seeded(scheme):
    cfg = TrainConfig(timestep_sampling=scheme)
    a = sample_sigmas(4096, 1024, cfg, torch.Generator().manual_seed(1), ShiftConstants())
    b = sample_sigmas(4096, 1024, cfg, torch.Generator().manual_seed(1), ShiftConstants())
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1


def test_shift_moves_mass_to_high_noise():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = sample_sigmas(20000, 256, TrainConfig(timestep_sampling="uniform"), gen())
    shifted = sample_sigmas(20000, 256, TrainConfig(timestep_sampling="shift", shift=3.0), gen())
    assert shifted.mean() > uniform.mean() + 0.1
    # resolution-dependent shift grows with the token count
    flux = ShiftConstants()
    assert resolution_shift(4096, flux) > resolution_shift(256, flux)
    small = sample_sigmas(20000, 256, TrainConfig(timestep_sampling="resolution_shift"), gen(), flux)
    large = sample_sigmas(20000, 4096, TrainConfig(timestep_sampling="resolution_shift"), gen(), flux)
    assert large.mean() > small.mean()


def test_resolution_shift_without_the_models_constants_is_refused():
    """No silent FLUX default: a caller that forgets the model's constants fails loudly."""
    with pytest.raises(ValueError, match="ShiftConstants"):
        sample_sigmas(4, 256, TrainConfig(timestep_sampling="resolution_shift"), torch.Generator().manual_seed(0))


def test_flux_shift_is_an_alias_of_resolution_shift():
    assert TrainConfig(timestep_sampling="flux_shift").timestep_sampling == "resolution_shift"


def test_add_noise_interpolates_and_targets_velocity():
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    noisy = add_noise(x0, torch.tensor([0.0, 1.0]), noise)
    assert torch.allclose(noisy.latents[0], x0[0]) and torch.allclose(noisy.latents[1], noise[1])
    assert torch.allclose(noisy.target, noise - x0)


def _sample(key, grid, length, controls=()):
    n = grid[0] * grid[1]
    return EncodedSample(key=key, latents=torch.randn(n, 4), grid=grid,
                         prompt=PromptEmbeds(hidden=torch.randn(length, 8), pooled=torch.randn(6)),
                         controls=[torch.randn(g[0] * g[1], 4) for g in controls], control_grids=list(controls))


def test_collate_pads_prompts_with_mask():
    batch = collate([_sample("a", (2, 2), 3, [(1, 2)]), _sample("b", (2, 2), 5, [(1, 2)])])
    assert batch.latents.shape == (2, 4, 4) and batch.controls[0].shape == (2, 2, 4)
    assert batch.prompt.hidden.shape == (2, 5, 8) and batch.prompt.pooled.shape == (2, 6)
    assert batch.prompt.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.all(batch.prompt.hidden[0, 3:] == 0)


def test_equal_length_unmasked_prompts_stay_unmasked():
    assert stack_prompts([PromptEmbeds(torch.ones(3, 2)), PromptEmbeds(torch.ones(3, 2))]).mask is None


def test_collate_refuses_different_target_grids():
    with pytest.raises(ValueError):
        collate([_sample("a", (2, 2), 3), _sample("b", (2, 4), 3)])


def test_bucket_sampler_epoch_covers_each_sample_once_in_single_target_grid_batches():
    # (target grid, control grids) signatures; the control layouts differ within each target grid
    signatures = [((1, 1), ())] * 3 + [((1, 1), ((1, 1),))] * 2 + [((2, 2), ((2, 2),))] * 2 + [((2, 2), ())]
    sampler = BucketBatchSampler(signatures, batch_size=2, seed=3)
    batches = sampler.epoch(0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(8))
    assert all(len({signatures[i][0] for i in b}) == 1 for b in batches)
    assert len(batches) == 5  # buckets of 5 and 3 target grids: 3 + 2 batches (by signature it would be 6)
    assert sampler.epoch(0) == batches and sampler.epoch(1) != batches


def test_bucket_order_is_unchanged_when_each_target_grid_has_one_control_layout():
    """Keyed by the target grid instead of the whole signature: a dataset where the grid decides the layout
    (every run before mixed layouts could exist in one batch) gets the very same batches, so resumes hold."""
    grids = [(1, 1), (2, 2), (1, 3), (3, 1), (2, 3), (12, 2), (1, 11)]
    signatures = [(grids[i % 7], ((grids[i % 7][1], 1),) * (i % 7 % 3)) for i in range(40)]
    for seed in range(5):
        old = _old_epochs(signatures, 3, seed)
        new = BucketBatchSampler(signatures, batch_size=3, seed=seed)
        assert [new.epoch(e) for e in range(3)] == old


def _old_epochs(signatures, batch_size, seed):
    """``BucketBatchSampler`` as it was (buckets keyed by the whole signature), three epochs: the oracle."""
    import random
    from collections import defaultdict

    buckets = defaultdict(list)
    for index, signature in enumerate(signatures):
        buckets[signature].append(index)
    out = []
    for epoch in range(3):
        rng = random.Random(seed * 1_000_003 + epoch)
        batches = []
        for signature in sorted(buckets, key=repr):
            indices = list(buckets[signature])
            rng.shuffle(indices)
            batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
        rng.shuffle(batches)
        out.append(batches)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("per_rank", [1, 2])
def test_rank_batches_count_every_sample_once_with_equal_weight(world, per_rank):
    # buckets of 7, 3 and 1 target grids (controls of two layouts in the first): short last batches
    signatures = [((1, 1), ())] * 4 + [((1, 1), ((1, 1),))] * 3 + [((2, 2), ())] * 3 + [((3, 3), ())]
    sampler = BucketBatchSampler(signatures, batch_size=per_rank * world, seed=5)
    ranks = [rank_batches(sampler, 0, r, world) for r in range(world)]
    assert len({len(batches) for batches in ranks}) == 1  # every process runs the same micro-batches
    weight: dict[int, float] = {}
    for i, global_batch in enumerate(sampler.epoch(0)):
        for r in range(world):
            mine = ranks[r][i]
            assert mine.indices and {signatures[j][0] for j in mine.indices} == {signatures[global_batch[0]][0]}
            for j in mine.indices:  # what the all-reduce mean gives each sample of a per-rank mean loss
                weight[j] = weight.get(j, 0.0) + mine.loss_scale / len(mine.indices) / world
        for j in global_batch:
            assert weight.pop(j) == pytest.approx(1 / len(global_batch))  # counted once, like one process
        assert not weight  # placeholders (scale 0) added nothing
    if world == 1:
        assert all(b.loss_scale == 1.0 and b.indices == g for b, g in zip(ranks[0], sampler.epoch(0)))
