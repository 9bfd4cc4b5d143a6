"""``data.reference_dropout``: each control of a training sample dropped with probability p, independently,
from the sample's own random stream; p = 0 changes nothing (not even the streams); prompts encoded per subset
of the controls (``EncodedSample.subset_prompts``) replace a prompt that saw the dropped ones."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from qflux.config.schema import DataConfig, QfluxConfig
from qflux.training.batching import collate
from qflux.training.step import (
    apply_caption_dropout,
    apply_dropout,
    keep_references,
    make_batch,
    reference_dropout_draws,
    sample_generator,
    validation_loss_sum,
)
from qflux.types import EncodedSample, PromptEmbeds


def prompt(value: float, length: int = 3) -> PromptEmbeds:
    return PromptEmbeds(hidden=torch.full((length, 4), value), pooled=torch.full((2,), value))


def sample(key: str = "s", controls: int = 3, subsets: bool = False) -> EncodedSample:
    """A 2x2-token sample with ``controls`` references of distinct grids; with ``subsets``, a prompt and an
    empty prompt per proper subset of them, each of its own value."""
    grids = [(1, 1), (1, 2), (2, 1)][:controls]
    s = EncodedSample(key=key, latents=torch.randn(4, 8), grid=(2, 2), prompt=prompt(1.0),
                      controls=[torch.full((h * w, 8), float(i)) for i, (h, w) in enumerate(grids)],
                      control_grids=list(grids), empty_prompt=prompt(-1.0, 1))
    if subsets:
        keys = [",".join(str(i) for i in range(controls) if m >> i & 1) for m in range(2 ** controls - 1)]
        s.subset_prompts = {k: prompt(10.0 + n) for n, k in enumerate(keys)}
        s.subset_empty_prompts = {k: prompt(-10.0 - n, 1) for n, k in enumerate(keys)}
    return s


def kept_of(s: EncodedSample) -> list[int]:
    """Which of its original controls ``s`` still carries (each control is filled with its index)."""
    return [int(c[0, 0]) for c in s.controls]


# --------------------------------------------------------------------------- rates


def test_each_reference_drops_at_the_configured_rate_independently():
    p, n = 0.3, 4000
    s = sample()
    kept = [reference_dropout_draws([s], p, [sample_generator(7, epoch, s.key)])[0] for epoch in range(n)]
    dropped = torch.tensor([[i not in k for i in range(3)] for k in kept], dtype=torch.float64)
    rates = dropped.mean(0)
    assert all(abs(float(r) - p) < 0.03 for r in rates), rates
    assert abs(float(dropped.all(1).double().mean()) - p**3) < 0.01  # all dropped: a text-to-image step, ~2.7 %
    assert abs(float((dropped[:, 0] * dropped[:, 2]).mean()) - p * p) < 0.02  # independent draws
    assert abs(float((dropped == 0).all(1).double().mean()) - (1 - p) ** 3) < 0.03
    # over keys too (another stream per sample)
    keys = [reference_dropout_draws([sample(f"k{i}")], p, [sample_generator(7, 0, f"k{i}")])[0] for i in range(n)]
    assert abs(sum(3 - len(k) for k in keys) / (3 * n) - p) < 0.02


def test_p_one_drops_every_reference_and_p_zero_none():
    samples = [sample("a"), sample("b", 1), sample("c", 0)]
    gens = [sample_generator(0, 0, s.key) for s in samples]
    assert reference_dropout_draws(samples, 1.0, gens) == [[], [], []]
    assert reference_dropout_draws(samples, 0.0, gens) == [[0, 1, 2], [0], []]


def test_draws_are_a_function_of_seed_epoch_and_key():
    def draw(seed, epoch, key):
        s = sample(key)
        return apply_dropout([s], 0.2, 0.5, [sample_generator(seed, epoch, key)])[0].control_grids

    assert draw(3, 1, "a") == draw(3, 1, "a")
    runs = {tuple(draw(3, e, "a")) for e in range(40)}
    assert len(runs) > 4  # epochs draw anew
    assert [draw(3, e, "a") for e in range(40)] != [draw(4, e, "a") for e in range(40)]  # and seeds


# --------------------------------------------------------------------------- p = 0 changes nothing


def _old_make_batch(samples, config, epoch, device, dtype):
    """``make_batch`` as it was before reference dropout (verbatim but for the name): the oracle."""
    generators = [sample_generator(config.train.seed, epoch, s.key) for s in samples]
    samples = apply_caption_dropout(samples, config.data.caption_dropout, generators)
    return collate(samples).to(device, dtype), generators


@pytest.mark.parametrize("caption", [0.0, 0.5])
def test_p_zero_leaves_samples_and_streams_as_they_were(caption):
    config = QfluxConfig(data={"caption_dropout": caption}, train={"seed": 5})
    assert config.data.reference_dropout == 0.0
    samples = [sample(f"k{i}", 2) for i in range(8)]
    batch, gens = make_batch(samples, config, 3, "cpu", torch.float32)
    old_batch, old_gens = _old_make_batch(samples, config, 3, "cpu", torch.float32)
    assert torch.equal(batch.latents, old_batch.latents) and torch.equal(batch.prompt.hidden, old_batch.prompt.hidden)
    assert all(torch.equal(a, b) for a, b in zip(batch.controls, old_batch.controls)) and not batch.mixed
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, old_gens))
    if caption == 0.0:  # nothing drawn at all
        fresh = [sample_generator(5, 3, s.key) for s in samples]
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, fresh))
        assert all(out is s for out, s in zip(apply_dropout(samples, 0.0, 0.0, fresh), samples))
    noise = [torch.randn(4, 8, generator=g) for g in gens]  # the noise the step draws next: identical
    assert all(torch.equal(a, torch.randn(4, 8, generator=b)) for a, b in zip(noise, old_gens))


def test_reference_dropout_keeps_the_caption_decisions():
    """The caption's draw comes first: switching reference dropout on drops the same captions."""
    samples = [sample(f"k{i}", 2) for i in range(200)]

    def captions(reference):
        out = apply_dropout(samples, 0.5, reference, [sample_generator(0, 0, s.key) for s in samples])
        return [s.prompt.hidden.shape[0] == 1 for s in out]  # the empty prompt has one token

    assert captions(0.0) == captions(0.7) and 50 < sum(captions(0.0)) < 150


# --------------------------------------------------------------------------- prompts


def test_prompt_is_kept_when_the_trainer_encodes_no_subsets():
    s = sample()
    out = keep_references(s, [2])
    assert out.control_grids == [(2, 1)] and torch.equal(out.controls[0], s.controls[2])
    assert out.prompt is s.prompt and out.empty_prompt is s.empty_prompt
    assert keep_references(s, [0, 1, 2]) is s


def test_subset_prompts_replace_prompt_and_empty_prompt():
    s = sample(subsets=True)
    seen = set()
    for epoch in range(200):
        for caption in (0.0, 1.0):
            out = apply_dropout([s], caption, 0.5, [sample_generator(0, epoch, s.key)])[0]
            kept = kept_of(out)
            subset = ",".join(str(i) for i in kept)
            if len(kept) == 3:
                want = s.empty_prompt if caption else s.prompt
            else:
                want = (s.subset_empty_prompts if caption else s.subset_prompts)[subset]
            assert out.prompt is want, (subset, caption)
            assert out.subset_prompts is None or len(kept) == 3  # stale keys are not handed on
            seen.add(subset)
    assert seen == {"", "0", "1", "2", "0,1", "0,2", "1,2", "0,1,2"}


def test_a_missing_subset_stops_the_step_with_the_sample_named():
    s = sample(subsets=True)
    del s.subset_prompts["0,2"]
    with pytest.raises(ValueError, match=r"sample s: .*'0,2'"):
        keep_references(s, [0, 2])


# --------------------------------------------------------------------------- batches, validation, config


def test_make_batch_mixes_layouts_and_p_one_makes_text_to_image():
    samples = [sample(f"k{i}") for i in range(12)]
    batch, _ = make_batch(samples, QfluxConfig(data={"reference_dropout": 0.5}), 0, "cpu", torch.float32)
    assert batch.mixed and batch.size == 12 and len(batch.layout_groups()) > 2
    batch, _ = make_batch(samples, QfluxConfig(data={"reference_dropout": 1.0}), 0, "cpu", torch.float32)
    assert not batch.mixed and batch.controls == [] and batch.control_grids == []  # all text-to-image


def test_validation_never_drops_references():
    class Recording:
        controls: list[int] = []

        def predict(self, transformer, batch, noisy, model):
            self.controls.append(len(batch.controls))
            return noisy.latents

    class Hook:
        @staticmethod
        def qflux_loss(prediction, noisy, batch, loss):
            return (prediction - noisy.target).square().mean()

    fake = Recording()
    config = QfluxConfig(data={"reference_dropout": 1.0})
    validation_loss_sum(Hook(), fake, None, [collate([sample("a")])], config, seed=0)
    assert fake.controls == [3] * 5


def test_config_range():
    assert DataConfig(reference_dropout=0.3).reference_dropout == 0.3
    for bad in (1.5, -0.1):
        with pytest.raises(ValidationError, match="reference_dropout"):
            DataConfig(reference_dropout=bad)
