"""``timestep_sampling: resolution_shift`` uses each model's own scheduler constants (issue 13 section 3), and
``logit_mean`` has the sign the docs state.

The expected values come from diffusers' code (the pipelines' ``calculate_shift`` and the scheduler's
``time_shift``) applied to the scheduler built from the model's config, never from qflux's constants.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qflux.config.schema import ModelConfig, TrainConfig
from qflux.plugins import build_registry
from qflux.testing import spied_registry
from qflux.training.shift_source import model_shift
from qflux.training.step import sample_generator
from qflux.training.timesteps import ShiftConstants, sample_sigmas

TOKENS_1MP = 4096  # a 1024 x 1024 target: (1024 / 16) ** 2 tokens


def pipeline_calculate_shift(trainer: str):
    """The ``calculate_shift`` of the trainer's diffusers pipeline module."""
    if trainer == "kontext":
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
    else:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift
    return calculate_shift


def diffusers_mu(scheduler, trainer: str, tokens: int) -> float:
    """mu exactly as the pipeline computes it from its scheduler's config."""
    c = scheduler.config
    return pipeline_calculate_shift(trainer)(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def sigmas_of(trainer: str, tokens: int, n: int = 10_000, model: ModelConfig | None = None,
              **train: object) -> tuple[torch.Tensor, ShiftConstants, object]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    registry = build_registry()
    info = registry.trainer(trainer)
    model = model or ModelConfig(pretrained="builtin:tiny", dtype="float32")
    shift = model_shift(info, model).constants
    config = TrainConfig(timestep_sampling="resolution_shift", **train)
    sigmas = sample_sigmas(n, tokens, config, torch.Generator().manual_seed(0), shift)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(info.scheduler_config(model))
    return sigmas, shift, scheduler


@pytest.mark.parametrize(("trainer", "median_1mp"), [("qwen-edit", 0.667), ("qwen-edit-2511", 0.667),
                                                     ("kontext", 0.760)])
def test_median_sigma_at_1mp_is_the_models_own(trainer, median_1mp):
    """Qwen: mu 0.694 (shift 2.0), median 0.667; Kontext: mu 1.15 (shift 3.16), median 0.76. Before the fix
    every trainer got FLUX's constants, so Qwen's median was 0.76."""
    sigmas, shift, scheduler = sigmas_of(trainer, TOKENS_1MP)
    mu = diffusers_mu(scheduler, trainer, TOKENS_1MP)
    assert shift.mu(TOKENS_1MP) == pytest.approx(mu, abs=1e-9)
    # the median of logit-normal(0, 1) is 0.5; the shift is monotone, so the median maps to time_shift(0.5)
    expected = float(scheduler.time_shift(mu, 1.0, torch.tensor(0.5)))
    assert float(sigmas.median()) == pytest.approx(expected, abs=0.01)
    assert float(sigmas.median()) == pytest.approx(median_1mp, abs=0.01)


@pytest.mark.parametrize("trainer", ["qwen-edit", "kontext"])
def test_each_sigma_equals_the_schedulers_time_shift(trainer):
    """Element by element against diffusers' scheduler, at several resolutions."""
    for tokens in (256, 1024, 4096, 6000):
        shifted, _, scheduler = sigmas_of(trainer, tokens, n=2000)
        base = sample_sigmas(2000, tokens, TrainConfig(timestep_sampling="logit_normal"),
                             torch.Generator().manual_seed(0))
        expected = scheduler.time_shift(diffusers_mu(scheduler, trainer, tokens), 1.0, base.double())
        torch.testing.assert_close(shifted.double(), expected.clamp(1e-4, 1 - 1e-4), atol=1e-5, rtol=0)


def test_a_diffusers_folders_scheduler_config_is_what_is_read(tmp_path):
    """A folder whose scheduler says other constants gets those (not the builtin or FLUX's), ``~`` expanded."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    custom = dict(base_image_seq_len=64, max_image_seq_len=2048, base_shift=0.2, max_shift=1.7,
                  use_dynamic_shifting=True)
    FlowMatchEulerDiscreteScheduler(**custom).save_pretrained(tmp_path / "model" / "scheduler")
    for trainer in ("kontext", "qwen-edit"):
        _, shift, scheduler = sigmas_of(trainer, 1000, n=10, model=ModelConfig(pretrained=str(tmp_path / "model")))
        assert (shift.base_image_seq_len, shift.max_image_seq_len, shift.base_shift, shift.max_shift) == (
            64, 2048, 0.2, 1.7)
        assert shift.mu(1000) == pytest.approx(diffusers_mu(scheduler, trainer, 1000))


def test_a_plugin_without_the_hook_gets_a_folders_config_then_diffusers_defaults(tmp_path, monkeypatch):
    from qflux.testing import wrap_trainer
    from qflux.training import shift_source

    registry = build_registry()
    silent = wrap_trainer(registry, "kontext", scheduler_config=lambda inner, model: None)
    folder = tmp_path / "m"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"max_shift": 0.9,
                                                                            "max_image_seq_len": 8192}))
    monkeypatch.setenv("HOME", str(tmp_path))
    found = shift_source.model_shift(silent, ModelConfig.model_construct(pretrained="~/m"))
    assert (found.constants.max_shift, found.constants.max_image_seq_len, found.constants.base_shift) == (
        0.9, 8192, 0.5)
    default = shift_source.model_shift(silent, ModelConfig(pretrained="owner/name"))
    assert default.constants == ShiftConstants() and "defaults" in default.source


def test_the_loop_reads_the_constants_once_and_noises_with_them(make_config):
    """End to end (tiny Kontext, whose scheduler config a plugin overrides with constants of no real model, so
    a loop falling back to FLUX's cannot pass): every sigma reaching ``Trainer.predict`` is diffusers'
    ``time_shift`` of the sample's own logit-normal draw with that config's mu; it is read once per run."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qflux.run.train import train

    custom = dict(base_image_seq_len=1, max_image_seq_len=64, base_shift=0.1, max_shift=2.5, use_dynamic_shifting=True)

    class Spy:
        def __init__(self) -> None:
            self.reads, self.seen = 0, []

        def scheduler_config(self, inner, model):
            self.reads += 1
            return dict(custom)

        def predict(self, inner, transformer, batch, noisy, model):
            if transformer.training:  # not the validation loss
                self.seen.append((list(batch.keys), batch.latents.shape[1], noisy.sigmas.detach().cpu()))
            return inner(transformer, batch, noisy, model)

    spy = Spy()
    config = make_config("kontext", train={"max_steps": 2, "save_every": 0, "batch_size": 2,
                                           "timestep_sampling": "flux_shift"})
    assert config.train.timestep_sampling == "resolution_shift"
    result = train(config, registry=spied_registry(spy))
    assert result.steps == 2 and spy.reads == 1 and len(spy.seen) == 2

    scheduler = FlowMatchEulerDiscreteScheduler(**custom)
    for keys, tokens, sigmas in spy.seen:
        mu = diffusers_mu(scheduler, "kontext", tokens)
        base = torch.sigmoid(torch.cat([torch.randn(1, generator=sample_generator(0, 0, k)) for k in keys]))
        expected = scheduler.time_shift(mu, 1.0, base)
        torch.testing.assert_close(sigmas.float(), expected.float(), atol=1e-6, rtol=0)


def test_logit_mean_sign_positive_means_more_noise():
    """docs/config.md: sigma = sigmoid(logit_mean + logit_std n), so logit_mean 1 gives mean sigma > 0.5;
    diffusers' scripts, with the same value, give less noise (their sigma is about 1 - u)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = sample_sigmas(10_000, 1024, TrainConfig(logit_mean=1.0), torch.Generator().manual_seed(0))
    assert float(ours.mean()) > 0.5
    assert math.isclose(float(ours.mean()), 0.70, abs_tol=0.02)  # E[sigmoid(N(1, 1))] is about 0.70

    # diffusers' train_dreambooth_lora_flux_kontext.py: u -> timesteps[int(u * 1000)] of the training scheduler
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    u = compute_density_for_timestep_sampling("logit_normal", 10_000, logit_mean=1.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    theirs = scheduler.sigmas[(u * scheduler.config.num_train_timesteps).long()]
    assert float(theirs.mean()) < 0.5
    assert math.isclose(float(theirs.mean()), 1.0 - float(ours.mean()), abs_tol=0.02)
