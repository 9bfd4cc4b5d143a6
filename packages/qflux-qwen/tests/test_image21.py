"""``qwen-image-2.1`` against ``QwenImage21Pipeline`` on the tiny model (float32, CPU): prompt states and image slots,
condition latents, one transformer forward and sampled pixels, with 0, 1 and 2 condition images; refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qflux.errors import UserError
from qflux.types import EditSample, ModelBundle, NoisyInput, SampleRequest
from qflux_qwen.plugin import TRAINERS

TRAINER = TRAINERS["qwen-image-2.1"]
PROMPT = "turn the red circle blue"
# output_resolution 80 maps both sizes onto themselves (calculate_dimensions(80 ** 2, aspect), multiples of 32), so
# the pipeline's own resize is the identity and both sides see the same pixels
SIZES = [(96, 64), (64, 64)]


@pytest.fixture(scope="module")
def pipe():
    from qflux_qwen.image21.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def encoders(model_config):
    return TRAINER.load_encoders(model_config())


@pytest.fixture(scope="module")
def transformer(model_config):
    return TRAINER.load_transformer(model_config())


def conditions(image, count):
    return [image(w, h, 30 + i) for i, (w, h) in enumerate(SIZES[:count])]


@pytest.mark.parametrize("count", [0, 1, 2])
def test_prompt_and_condition_latents_equal_the_pipelines(count, pipe, encoders, model_config, image):
    conds = conditions(image, count)
    [encoded] = TRAINER.encode(encoders, [EditSample("s", PROMPT, image(64, 96, 1), conds)], model_config(),
                               empty_prompt=True)
    rgba = [c.convert("RGBA") for c in conds]
    hidden, mask, slots = pipe.encode_prompt(PROMPT, image=rgba or None, device="cpu")
    assert mask is None and torch.equal(encoded.prompt.hidden, hidden[0])
    assert torch.equal(encoded.prompt.image_slots, slots[0].bool())
    assert int(encoded.prompt.image_slots.sum()) == sum(w * h // 1024 for w, h in SIZES[:count])  # one per 32 px
    assert torch.equal(encoded.empty_prompt.hidden, pipe.encode_prompt("", image=rgba or None, device="cpu")[0][0])
    vae_images = [pipe.image_processor.preprocess(c, width=c.width, height=c.height).unsqueeze(2) for c in rgba]
    target, theirs = pipe.prepare_latents(vae_images or None, 1, 64, 96, 64, torch.float32, "cpu", None,
                                          latents=torch.zeros(1, 24, 64))
    assert encoded.latents.shape == (24, 64) and encoded.grid == (6, 4)
    if count:
        assert torch.equal(torch.cat(encoded.controls), theirs[0])
        assert encoded.control_grids == [(h // 16, w // 16) for w, h in SIZES[:count]]


def test_same_picture_as_target_and_condition_gives_identical_tokens(encoders, model_config, image):
    picture = image(64, 96, 5)
    [encoded] = TRAINER.encode(encoders, [EditSample("s", PROMPT, picture, [picture])], model_config(), False)
    assert torch.equal(encoded.latents, encoded.controls[0]) and encoded.grid == encoded.control_grids[0]


def test_training_forward_equals_the_pipelines_call(pipe, transformer, encoders, model_config, image):
    conds = conditions(image, 2)
    [a, b] = TRAINER.encode(encoders, [EditSample("a", PROMPT, image(64, 64, 1), conds),
                                       EditSample("b", "make it much larger and green", image(64, 64, 2), conds)],
                            model_config(), False)
    from qflux.training.batching import collate

    batch = collate([a, b])
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 64, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    ours = TRAINER.predict(transformer, batch, NoisyInput(noisy, sigmas, noisy), model_config())
    mask = batch.prompt.mask
    img_mask = torch.cat([batch.prompt.image_slots, torch.ones(2, 4, dtype=torch.bool)], dim=1)
    theirs = pipe.transformer(
        hidden_states=torch.cat([*batch.controls, noisy], dim=1), timestep=sigmas, encoder_hidden_states=batch.prompt.hidden,
        encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 6), (1, 4, 4), (1, 4, 4)]] * 2, img_mask=img_mask,
        return_dict=False)[0][:, -16:]
    assert mask is not None  # the two prompts differ in length: the second row is padded and masked
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # each row equals that sample alone (padding changes nothing)
    alone = TRAINER.predict(transformer, collate([b]), NoisyInput(noisy[1:], sigmas[1:], noisy[1:]), model_config())
    assert torch.allclose(ours[1:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("count, cfg", [(0, 1.0), (1, 1.0), (2, 3.0)])
def test_sampled_pixels_equal_the_pipelines(count, cfg, pipe, transformer, encoders, model_config, image):
    conds = conditions(image, count)
    bundle = ModelBundle(trainer=TRAINER, model=model_config(), transformer=transformer, encoders=encoders)
    request = SampleRequest(prompt=PROMPT, controls=conds, height=64, width=96, steps=3, seed=7, true_cfg=cfg,
                            negative_prompt="blurry")
    ours = np.asarray(TRAINER.sample(bundle, request))
    kwargs = dict(prompt=PROMPT, image=conds or None, height=64, width=96, num_inference_steps=3,
                  output_resolution=80, true_cfg_scale=cfg, negative_prompt="blurry" if cfg > 1 else None)
    exact = pipe(generator=torch.Generator().manual_seed(7), use_kv_cache=False, **kwargs).images[0]
    cached = pipe(generator=torch.Generator().manual_seed(7), use_kv_cache=True, **kwargs).images[0]
    assert ours.shape == (64, 96, 3)
    assert np.array_equal(ours, np.asarray(exact.convert("RGB")))
    assert np.abs(ours.astype(int) - np.asarray(cached.convert("RGB")).astype(int)).max() <= 1


def test_bad_sizes_and_too_many_conditions_are_refused(encoders, model_config, image):
    with pytest.raises(UserError, match="multiples of 32"):
        TRAINER.encode(encoders, [EditSample("s", PROMPT, image(48, 64, 0))], model_config(), False)
    with pytest.raises(UserError, match="at most 4"):
        TRAINER.encode(encoders, [EditSample("s", PROMPT, image(64, 64, 0), [image(64, 64, 1)] * 5)],
                       model_config(), False)


def test_resolution_sizes_off_the_multiple_of_32_are_refused_before_any_work():
    from qflux.config.schema import QfluxConfig
    from qflux.errors import ConfigError

    with pytest.raises(ConfigError, match="1008x1024.*multiples of 32"):
        TRAINER.check(QfluxConfig(trainer="qwen-image-2.1", data={"resolution": [[1024, 1024], [1008, 1024]]}))
    TRAINER.check(QfluxConfig(trainer="qwen-image-2.1", data={"resolution": 1024}))
