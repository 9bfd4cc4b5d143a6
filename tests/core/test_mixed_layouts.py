"""Batches of one target grid whose samples differ in control layout (count or sizes of the references).

The diffusers transformers take one set of image position ids per forward, so such a batch runs one
``Trainer.predict`` per layout (``qflux.training.step.predict``); each row must be what the sample gives alone,
the loss that of the samples alone, and a uniform batch exactly what it was before mixed batches existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config.schema import ModelConfig, QfluxConfig
from qflux.plugins import build_registry
from qflux.testing import single_torch_thread
from qflux.training.batching import BucketBatchSampler, collate, rank_batches, stack_prompts
from qflux.training.step import (
    agreed_forwards,
    noisy_rows,
    predict,
    sample_generator,
    training_loss,
    validation_loss_sum,
)
from qflux.training.timesteps import add_noise
from qflux.types import Batch, EditSample, EncodedSample, NoisyInput, PromptEmbeds

MODEL = ModelConfig(pretrained="builtin:tiny", dtype="float32")
# batch order: layouts 1, 0, 2, 1 controls, so the groups ([0, 3], [1], [2]) run in an order that is not the
# batch's: a prediction put back in the wrong rows fails the per-row comparison
LAYOUT = {"one": [(32, 32)], "none": [], "two": [(32, 32), (48, 32)], "one_b": [(32, 32)]}


def rgb(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box they lose a lot."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def registry():
    from qflux_kontext import plugin

    return build_registry(load_entry_points=False, extra_plugins=[("kontext", plugin)])


@pytest.fixture(scope="module")
def trainer(registry):
    return registry.trainer("kontext")


@pytest.fixture(scope="module")
def transformer(trainer):
    return trainer.load_transformer(MODEL).eval()


@pytest.fixture(scope="module")
def encoded(trainer) -> list[EncodedSample]:
    """Four 32x32 targets with 1, 0, 2 and 1 controls and prompts of different length."""
    prompts = ["make it red", "a yellow triangle", "put the circle of picture 2 into picture 1", "swap"]
    samples = [EditSample(key, prompt, rgb(32, 32, 10 * i), [rgb(w, h, 10 * i + j + 1) for j, (w, h) in
                                                             enumerate(sizes)])
               for i, ((key, sizes), prompt) in enumerate(zip(LAYOUT.items(), prompts))]
    out = trainer.encode(trainer.load_encoders(MODEL), samples, MODEL, False)
    assert {s.grid for s in out} == {(2, 2)} and len({s.signature for s in out}) == 3
    return out


@pytest.fixture(scope="module")
def config() -> QfluxConfig:
    return QfluxConfig(trainer="kontext", model=MODEL.model_dump(), train={"timestep_sampling": "uniform"})


def noised(batch: Batch, seed: int = 0, sigmas: Sequence[float] | None = None) -> NoisyInput:
    """Per-sample noise from each sample's own stream (what the training step draws)."""
    gens = [sample_generator(seed, 0, k) for k in batch.keys]
    noise = torch.stack([torch.randn(batch.latents.shape[1:], generator=g) for g in gens])
    s = torch.tensor(sigmas if sigmas is not None else [0.2 + 0.6 * i / max(batch.size - 1, 1)
                                                        for i in range(batch.size)])
    return add_noise(batch.latents, s, noise)


class Recording:
    """A fake trainer: records the batches ``predict`` gets and answers with values that name each row."""

    def __init__(self) -> None:
        self.calls: list[Batch] = []

    def predict(self, transformer, batch, noisy, model):
        self.calls.append(batch)
        assert not batch.mixed and batch.size == noisy.latents.shape[0]  # the Trainer.predict contract
        return noisy.latents * 2 + len(batch.controls)


# --------------------------------------------------------------------------- collate


def _old_collate(samples):
    """``collate`` as it was before mixed layouts (verbatim): the oracle for uniform batches."""
    first = samples[0]
    if any(s.signature != first.signature for s in samples):
        raise ValueError("collate() needs samples of one signature (target grid and control grids)")
    masks = [s.mask for s in samples]
    masked = None
    if any(m is None for m in masks) and not all(m is None for m in masks):
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


def _same(a, b) -> bool:
    """Bitwise equality of two values made of tensors, lists, dataclasses and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def _synthetic(key: str, controls: list[tuple[int, int]], length: int, mask: bool = False) -> EncodedSample:
    g = torch.Generator().manual_seed(len(key) * 7 + length)
    return EncodedSample(key=key, latents=torch.randn(4, 8, generator=g), grid=(2, 2),
                         prompt=PromptEmbeds(hidden=torch.randn(length, 6, generator=g), pooled=torch.randn(3)),
                         controls=[torch.randn(h * w, 8, generator=g) for h, w in controls],
                         control_grids=list(controls), mask=torch.rand(4, generator=g) if mask else None)


def test_collate_of_a_uniform_batch_is_unchanged():
    samples = [_synthetic("a", [(1, 2)], 3, mask=True), _synthetic("bb", [(1, 2)], 5), _synthetic("c", [(1, 2)], 5)]
    batch = collate(samples)
    assert _same(batch, _old_collate(samples))
    assert batch.sample_controls is None and batch.sample_control_grids is None and not batch.mixed
    [(indices, group)] = batch.layout_groups()
    assert indices == [0, 1, 2] and group is batch  # one group, no copy
    moved = batch.to("cpu", torch.float64)
    assert moved.controls[0].dtype == torch.float64 and moved.sample_controls is None


def test_collate_of_a_mixed_batch_keeps_controls_per_sample_and_groups_them():
    samples = [_synthetic("a", [(1, 2)], 3, mask=True), _synthetic("bb", [], 5),
               _synthetic("ccc", [(1, 2), (2, 1)], 2), _synthetic("d", [(1, 2)], 4)]
    batch = collate(samples)
    assert batch.mixed and batch.controls == [] and batch.control_grids == []
    assert batch.sample_control_grids == [s.control_grids for s in samples]
    assert all(_same(got, s.controls) for got, s in zip(batch.sample_controls, samples))
    assert torch.equal(batch.latents, torch.stack([s.latents for s in samples]))
    assert batch.masked.tolist() == [True, False, False, False]
    groups = batch.layout_groups()
    assert [indices for indices, _ in groups] == [[0, 3], [1], [2]]
    for indices, group in groups:  # each group is the uniform batch of its samples, prompt padding and all
        expected = _old_collate([samples[i] for i in indices])
        assert _same(group.keys, expected.keys) and _same(group.latents, expected.latents)
        assert _same(group.controls, expected.controls) and group.control_grids == expected.control_grids
        assert _same(group.prompt.hidden, expected.prompt.hidden) and _same(group.prompt.pooled, expected.prompt.pooled)
        assert _same(group.prompt.mask, torch.ones_like(expected.prompt.hidden[..., 0], dtype=torch.long)
                     if expected.prompt.mask is None else expected.prompt.mask)
        assert _same(group.mask, batch.mask[indices]) and _same(group.masked, batch.masked[indices])


def test_mixed_batch_moves_its_per_sample_controls():
    batch = collate([_synthetic("a", [(1, 2)], 3), _synthetic("bb", [], 3)]).to("cpu", torch.float64)
    assert [[c.dtype for c in cs] for cs in batch.sample_controls] == [[torch.float64], []]
    assert batch.sample_control_grids == [[(1, 2)], []]
    assert batch.layout_groups()[0][1].controls[0].dtype == torch.float64


def test_collate_still_refuses_different_target_grids():
    other = _synthetic("b", [], 3)
    other.grid = (1, 4)  # as many tokens, another shape: other position ids
    with pytest.raises(ValueError, match="target grid"):
        collate([_synthetic("a", [], 3), other])


# --------------------------------------------------------------------------- batching


def test_bucket_sampler_puts_equal_targets_with_different_controls_in_one_batch():
    square, tall = (2, 2), (3, 2)
    signatures = [(square, ()), (square, ((2, 2),)), (square, ((2, 2), (1, 3))), (square, ((2, 2),)),
                  (tall, ((3, 2),)), (tall, ())]
    sampler = BucketBatchSampler(signatures, batch_size=4, seed=1)
    batches = sampler.epoch(0)
    assert sorted(len(b) for b in batches) == [2, 4]
    mixed = next(b for b in batches if len(b) == 4)
    assert sorted(mixed) == [0, 1, 2, 3]  # three control layouts, one batch
    assert all(len({signatures[i][0] for i in b}) == 1 for b in batches)  # never two target grids
    assert sampler.epoch(0) == batches and BucketBatchSampler(signatures, 4, 1).epoch(0) == batches
    ranks = [rank_batches(sampler, 0, r, 2) for r in range(2)]
    assert sorted(i for r in ranks for b in r for i in b.indices) == list(range(6))


# --------------------------------------------------------------------------- predict


def test_predict_runs_one_forward_per_layout_and_puts_rows_back_in_batch_order():
    samples = [_synthetic("a", [(1, 2)], 3), _synthetic("bb", [], 5), _synthetic("ccc", [(1, 2), (2, 1)], 2),
               _synthetic("d", [(1, 2)], 4)]
    batch = collate(samples)
    noisy = noised(batch)
    fake = Recording()
    out = predict(fake, None, batch, noisy, MODEL)
    assert [c.keys for c in fake.calls] == [["a", "d"], ["bb"], ["ccc"]]
    assert [c.prompt.hidden.shape[1] for c in fake.calls] == [4, 5, 2]  # each group's own longest prompt
    expected = noisy.latents * 2 + torch.tensor([1.0, 0.0, 2.0, 1.0])[:, None, None]
    assert torch.equal(out, expected)
    for (indices, _), call in zip(batch.layout_groups(), fake.calls):
        assert torch.equal(call.latents, batch.latents[indices])

    uniform = collate([samples[0], samples[3]])
    fake = Recording()
    noisy = noised(uniform)
    assert torch.equal(predict(fake, None, uniform, noisy, MODEL), noisy.latents * 2 + 1)
    assert len(fake.calls) == 1 and fake.calls[0] is uniform  # exactly today's call


def test_extra_forwards_change_neither_the_prediction_nor_the_gradient():
    """Processes agree on a forward count (FSDP: every forward is a collective); the padding ones weigh 0."""
    layer = torch.nn.Linear(8, 8)

    class Linear(Recording):
        def predict(self, transformer, batch, noisy, model):
            super().predict(transformer, batch, noisy, model)
            return transformer(noisy.latents) + sum(c.sum() for c in batch.controls)

    batch = collate([_synthetic("a", [(1, 2)], 3), _synthetic("bb", [], 5)])
    noisy = noised(batch)
    grads, outs = [], []
    for forwards in (1, 2, 4):
        layer.zero_grad()
        fake = Linear()
        out = predict(fake, layer, batch, noisy, MODEL, forwards)
        out.square().mean().backward()
        assert len(fake.calls) == max(2, forwards)
        outs.append(out.detach())
        grads.append(layer.weight.grad.clone())
    assert all(torch.equal(o, outs[0]) for o in outs) and all(torch.equal(g, grads[0]) for g in grads)


def test_processes_agree_on_the_most_forwards():
    class TwoProcesses:
        num_processes = 2

        def __init__(self, other: int) -> None:
            self.other = other

        def gather(self, t):
            return torch.cat([t, t.new_tensor([self.other])])

    mixed = collate([_synthetic("a", [(1, 2)], 3), _synthetic("bb", [], 5), _synthetic("c", [(2, 1)], 5)])
    uniform = collate([_synthetic("a", [(1, 2)], 3)])
    assert agreed_forwards(TwoProcesses(1), mixed) == 3
    assert agreed_forwards(TwoProcesses(2), uniform) == 2
    one = TwoProcesses(5)
    one.num_processes = 1
    assert agreed_forwards(one, uniform) == 1  # one process: no collective, no padding


# --------------------------------------------------------------------------- the real tiny Kontext trainer


def test_mixed_prediction_of_each_row_equals_the_sample_alone(trainer, transformer, encoded):
    batch = collate(encoded)
    assert batch.mixed and [len(g) for g in batch.sample_control_grids] == [1, 0, 2, 1]
    noisy = noised(batch)
    with torch.no_grad():
        mixed = predict(trainer, transformer, batch, noisy, MODEL)
        alone = [trainer.predict(transformer, collate([s]), noisy_rows(noisy, [i]), MODEL)[0]
                 for i, s in enumerate(encoded)]
    assert mixed.shape == batch.latents.shape
    for i in range(batch.size):
        torch.testing.assert_close(mixed[i], alone[i], rtol=0, atol=1e-6)
    # the rows differ from one another by far more than that: a row put in another's place would fail above
    assert min(float((alone[i] - alone[j]).abs().max()) for i in range(4) for j in range(i)) > 1e-2


def test_mixed_loss_is_the_mean_of_the_samples_alone(registry, trainer, transformer, encoded, config):
    def loss(samples):
        batch = collate(samples)
        generators = [sample_generator(config.train.seed, 3, s.key) for s in samples]
        with torch.no_grad():
            return float(training_loss(registry.hook, trainer, transformer, batch, config, generators))

    mixed = loss(encoded)
    singles = [loss([s]) for s in encoded]
    assert mixed == pytest.approx(sum(singles) / len(singles), rel=1e-6, abs=0)
    assert max(singles) - min(singles) > 1e-3  # distinct: the mean is not met by chance

    total, count = validation_loss_sum(registry.hook, trainer, transformer, [collate(encoded)], config, seed=0)
    totals = [validation_loss_sum(registry.hook, trainer, transformer, [collate([s])], config, seed=0)
              for s in encoded]
    assert count == sum(c for _, c in totals) == 4 * 5
    assert total == pytest.approx(sum(t for t, _ in totals), rel=1e-6, abs=0)


def test_mixed_batch_trains_every_layout(trainer, transformer, encoded, config, registry):
    """The backward runs through every layout's forward: its gradient is the mean of the samples' alone."""
    params = [transformer.x_embedder.weight, transformer.proj_out.weight]  # the base is frozen: train two
    for p in params:
        p.requires_grad_(True)
    try:
        _gradients_match(registry, trainer, transformer, encoded, config, params)
    finally:
        for p in params:
            p.requires_grad_(False)


def _gradients_match(registry, trainer, transformer, encoded, config, params) -> None:
    batch = collate(encoded)
    generators = [sample_generator(0, 0, s.key) for s in encoded]
    loss = training_loss(registry.hook, trainer, transformer, batch, config, generators)
    grads = torch.autograd.grad(loss, params)
    expected = None
    for s in encoded:
        one = training_loss(registry.hook, trainer, transformer, collate([s]), config,
                            [sample_generator(0, 0, s.key)])
        g = torch.autograd.grad(one / len(encoded), params)
        expected = g if expected is None else [a + b for a, b in zip(expected, g)]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
