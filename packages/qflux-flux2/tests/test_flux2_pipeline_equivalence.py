"""qflux's FLUX.2 stages against the diffusers pipelines' own code, on the tiny models (float32, CPU).

Each test feeds the pipeline and qflux the same inputs and demands the same tensors: prompt embeddings (the
text encoder layers and template the pipeline uses), packed reference latents and their 4-axis ids with 0, 1
and 3 references, one transformer forward of a training step against the pipeline's own call, and whole
sampled images against ``Flux2Pipeline`` / ``Flux2KleinPipeline.__call__`` for the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qflux.types import Batch, EditSample, ModelBundle, NoisyInput, PromptEmbeds, SampleRequest
from qflux_flux2.plugin import TRAINERS

NAMES = ["flux2-dev", "flux2-klein"]
PROMPT = "turn the red circle blue"


@pytest.mark.parametrize("name", NAMES)
def test_prompt_embeddings_equal_the_pipelines(name, pipelines, encoders, model_config, image):
    pipe = pipelines[name]
    [encoded] = TRAINERS[name].encode(encoders[name], [EditSample("s", PROMPT, image(64, 64, 0))], model_config(),
                                      empty_prompt=True)
    ours, empty = encoded.prompt.hidden, encoded.empty_prompt.hidden
    theirs, text_ids = pipe.encode_prompt(PROMPT, device="cpu")  # the pipeline's defaults: 512 tokens, its layers
    assert ours.shape == theirs[0].shape == (512, 48)
    assert torch.equal(ours, theirs[0])
    assert torch.equal(empty, pipe.encode_prompt("", device="cpu")[0][0])
    assert not torch.equal(ours, empty)
    assert encoded.prompt.mask is None  # the transformer sees all 512 tokens, as in the pipelines


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [0, 1, 3])
def test_reference_latents_and_ids_equal_the_pipelines(name, count, pipelines, encoders, model_config, image):
    from qflux_flux2.predict import image_ids

    pipe = pipelines[name]
    sizes = [(64, 96), (80, 64), (64, 64)][:count]
    references = [image(w, h, 10 + i) for i, (w, h) in enumerate(sizes)]
    target = image(48, 32, 1)
    [encoded] = TRAINERS[name].encode(encoders[name], [EditSample("s", PROMPT, target, references)], model_config(),
                                      empty_prompt=False)
    assert encoded.control_grids == [(h // 16, w // 16) for w, h in sizes]
    ids = image_ids(encoded.grid, encoded.control_grids)
    latents, latent_ids = pipe.prepare_latents(1, 32, 32, 48, torch.float32, "cpu", torch.Generator().manual_seed(0))
    n = latents.shape[1]
    assert encoded.latents.shape == (n, 128) and torch.equal(ids[:n], latent_ids[0])
    if count:
        pixels = [pipe.image_processor.preprocess(r, height=r.height, width=r.width, resize_mode="crop")
                  for r in references]
        theirs, their_ids = pipe.prepare_image_latents(pixels, 1, None, "cpu", torch.float32)
        assert torch.equal(torch.cat(encoded.controls), theirs[0])
        assert torch.equal(ids[n:], their_ids[0])
        assert their_ids[0][:, 0].unique().tolist() == [10 * (i + 1) for i in range(count)]  # t = 10 + 10 i
    else:
        assert ids.shape[0] == n


@pytest.mark.parametrize("name", NAMES)
def test_same_picture_as_target_and_reference_gives_identical_tokens(name, encoders, model_config, image):
    picture = image(64, 80, 3)
    [encoded] = TRAINERS[name].encode(encoders[name], [EditSample("s", PROMPT, picture, [picture])], model_config(),
                                      empty_prompt=False)
    assert torch.equal(encoded.latents, encoded.controls[0]) and encoded.grid == encoded.control_grids[0]


@pytest.mark.parametrize("name", NAMES)
def test_training_forward_equals_the_pipelines_transformer_call(name, pipelines, transformers_, model_config):
    pipe = pipelines[name]
    transformer = transformers_[name]
    g = torch.Generator().manual_seed(0)
    grid, control_grids = (2, 3), [(4, 4), (2, 2)]
    latents = torch.randn(2, 6, 128, generator=g)
    controls = [torch.randn(2, h * w, 128, generator=g) for h, w in control_grids]
    prompt = torch.randn(2, 7, 48, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    batch = Batch(keys=["a", "b"], latents=latents, grid=grid, prompt=PromptEmbeds(prompt), controls=controls,
                  control_grids=control_grids)
    ours = TRAINERS[name].predict(transformer, batch, NoisyInput(latents, sigmas, latents), model_config())

    # the pipeline's call (its denoising loop): ids from its helpers, timestep t / 1000, guidance 1.0 (dev)
    latent_ids = pipe._prepare_latent_ids(torch.empty(2, 128, *grid))
    ref_ids = pipe._prepare_image_ids([torch.empty(1, 128, *g_) for g_ in control_grids]).repeat(2, 1, 1)
    guidance = torch.full([2], 1.0) if name == "flux2-dev" else None
    theirs = pipe.transformer(
        hidden_states=torch.cat([latents, *controls], dim=1), timestep=(sigmas * 1000) / 1000, guidance=guidance,
        encoder_hidden_states=prompt, txt_ids=pipe._prepare_text_ids(prompt),
        img_ids=torch.cat([latent_ids, ref_ids], dim=1), return_dict=False)[0][:, :6]
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # dev: the guidance value reaches the model; klein: there is none to reach
    other = TRAINERS[name].predict(transformer, batch, NoisyInput(latents, sigmas, latents),
                                   model_config(options={"guidance": 4.0}))
    assert torch.equal(other, ours) == (name == "flux2-klein")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [0, 1, 3])
def test_sampled_pixels_equal_the_pipelines(name, count, pipelines, transformers_, encoders, model_config, image):
    pipe = pipelines[name]
    references = [image(w, h, 20 + i) for i, (w, h) in enumerate([(64, 96), (96, 64), (64, 64)][:count])]
    bundle = ModelBundle(trainer=TRAINERS[name], model=model_config(), transformer=transformers_[name],
                         encoders=encoders[name])
    request = SampleRequest(prompt=PROMPT, controls=references, height=32, width=48, steps=3, seed=7)
    ours = np.asarray(TRAINERS[name].sample(bundle, request))
    # the pipeline's defaults: guidance_scale 4.0 (dev: embedded; klein: true CFG against "")
    theirs = pipe(image=references or None, prompt=PROMPT, height=32, width=48, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(7)).images[0]
    assert ours.shape == (32, 48, 3)
    assert np.array_equal(ours, np.asarray(theirs))


def test_klein_without_cfg_and_dev_guidance_change_the_image(transformers_, encoders, model_config, image):
    out = {}
    for name, guidance in [("flux2-klein", 1.0), ("flux2-klein", 4.0), ("flux2-dev", 1.0), ("flux2-dev", 4.0)]:
        bundle = ModelBundle(trainer=TRAINERS[name], model=model_config(), transformer=transformers_[name],
                             encoders=encoders[name])
        request = SampleRequest(prompt=PROMPT, height=32, width=32, steps=2, seed=1, guidance=guidance)
        out[name, guidance] = np.asarray(TRAINERS[name].sample(bundle, request))
    assert not np.array_equal(out["flux2-klein", 1.0], out["flux2-klein", 4.0])
    assert not np.array_equal(out["flux2-dev", 1.0], out["flux2-dev", 4.0])
