"""Tests of the kontext trainer against FluxKontextPipeline on builtin:tiny (CPU, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from qflux.config.schema import ModelConfig
from qflux.errors import UserError
from qflux.loss import mask_to_tokens
from qflux.types import Batch, ModelBundle, NoisyInput, PromptEmbeds, SampleRequest


def _batch(enc, *, controls=True) -> Batch:
    return Batch(
        keys=[enc.key],
        latents=enc.latents[None],
        grid=enc.grid,
        prompt=PromptEmbeds(hidden=enc.prompt.hidden[None], pooled=enc.prompt.pooled[None]),
        controls=[c[None] for c in enc.controls] if controls else [],
        control_grids=list(enc.control_grids) if controls else [],
    )


def _noisy(enc, sigma: float, seed: int = 0) -> NoisyInput:
    g = torch.Generator().manual_seed(seed)
    x0 = enc.latents[None]
    noise = torch.randn(x0.shape, generator=g)
    s = torch.tensor([sigma])
    return NoisyInput(latents=(1 - sigma) * x0 + sigma * noise, sigmas=s, target=noise - x0)


# --------------------------------------------------------------------------- plugin


def test_plugin_module_is_light():
    code = (
        "import sys, qflux_kontext.plugin as p; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; print(p.TRAINER.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "kontext"


def test_registered_via_entry_point_with_every_stage(monkeypatch):
    from qflux.plugins import build_registry

    monkeypatch.delenv("QFLUX_LOAD_PLUGINS", raising=False)
    registry = build_registry()
    trainer = registry.trainer("kontext")
    info = trainer.info
    assert info.family == "flux-kontext" and info.pipeline == "diffusers.FluxKontextPipeline"
    assert info.default_model == "black-forest-labs/FLUX.1-Kontext-dev" and info.max_controls == 3
    assert all(trainer.implements(stage) for stage in ("load_transformer", "load_encoders", "encode", "predict",
                                                        "sample", "scheduler_config"))
    assert next(p for p in registry.plugins if "kontext" in p.trainers).hooks == ["qflux_register_trainers"]


# --------------------------------------------------------------------------- tiny model


def test_tiny_is_deterministic_without_global_side_effects():
    from qflux_kontext.tiny import TRANSFORMER_CONFIG, tiny_transformer

    state = torch.get_rng_state()
    a, b = tiny_transformer(), tiny_transformer()
    assert torch.equal(state, torch.get_rng_state())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    n = sum(p.numel() for p in a.parameters())
    assert 1_000_000 < n < 5_000_000
    assert a.config.guidance_embeds and sum(TRANSFORMER_CONFIG["axes_dims_rope"]) == a.config.attention_head_dim
    assert not any(p.requires_grad for p in a.parameters())


def test_hook_components_equal_tiny_pipeline(pipe, transformer, encoders):
    assert encoders.max_sequence_length == 32 and encoders.vae_factor == 8
    assert encoders.vae.config.latent_channels * 4 == transformer.config.in_channels == 64
    assert encoders.text_encoder.config.hidden_size == transformer.config.pooled_projection_dim
    assert encoders.text_encoder_2.config.d_model == transformer.config.joint_attention_dim
    for mine, theirs in [
        (transformer, pipe.transformer),
        (encoders.vae, pipe.vae),
        (encoders.text_encoder_2, pipe.text_encoder_2),
    ]:
        for pa, pb in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert torch.equal(pa, pb)
    for m in encoders.modules.values():
        assert not m.training and not any(p.requires_grad for p in m.parameters())


# --------------------------------------------------------------------------- encode


def test_prompt_embeddings_equal_pipeline(pipe, encoded, samples):
    for s, e in zip(samples, encoded, strict=True):
        hidden, pooled, _ = pipe.encode_prompt(prompt=s.prompt, prompt_2=None, max_sequence_length=32)
        assert e.prompt.mask is None and e.prompt.hidden.dtype == torch.float32
        assert e.prompt.hidden.shape == (32, 64) and e.prompt.pooled.shape == (32,)
        torch.testing.assert_close(e.prompt.hidden, hidden[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e.prompt.pooled, pooled[0], rtol=1e-5, atol=1e-6)
        hidden, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, max_sequence_length=32)
        torch.testing.assert_close(e.empty_prompt.hidden, hidden[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e.empty_prompt.pooled, pooled[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(encoded[0].prompt.hidden, encoded[1].prompt.hidden)


def test_max_sequence_length_override_and_limit(registry, trainer, encoders, samples):
    model = ModelConfig(pretrained="builtin:tiny", dtype="float32", max_sequence_length=16)
    out = trainer.encode(encoders, samples[:1], model, False)
    assert out[0].prompt.hidden.shape == (16, 64) and out[0].empty_prompt is None
    with pytest.raises(UserError, match="512"):
        trainer.encode(encoders, samples[:1], ModelConfig(dtype="float32", max_sequence_length=513), False)


def _prepare(pipe, image, gen, target_size=None):
    """pipe.prepare_latents for ``image`` as the pipeline's control, generating at ``target_size`` (w, h)."""
    h, w = image.height, image.width
    tw, th = target_size or (w, h)
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w)
    return pipe.prepare_latents(pixels, 1, 16, th, tw, torch.float32, torch.device("cpu"), gen)


def test_latents_and_ids_equal_prepare_latents(pipe, encoded, samples, gen):
    from qflux_kontext.packing import image_ids, kontext_image_ids, unpack_latents

    for s, e in zip(samples, encoded, strict=True):
        # the target through the same VAE path, and its (index 0) ids
        _, target_latents, latent_ids, _ = _prepare(pipe, s.target, gen)
        assert e.grid == (s.target.height // 16, s.target.width // 16)
        assert e.latents.shape == (e.grid[0] * e.grid[1], 64) and e.latents.dtype == torch.float32
        torch.testing.assert_close(e.latents, target_latents[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(image_ids(e.grid, 0), latent_ids)
        # unpack inverts pack like the pipeline's _unpack_latents
        assert torch.equal(
            unpack_latents(e.latents[None], e.grid),
            pipe._unpack_latents(e.latents[None], s.target.height, s.target.width, 8),
        )
        for i, (c, ce) in enumerate(zip(s.controls, e.controls, strict=True)):
            _, control_latents, latent_ids, control_ids = _prepare(pipe, c, gen, s.target.size)
            assert e.control_grids[i] == (c.height // 16, c.width // 16)
            torch.testing.assert_close(ce, control_latents[0], rtol=1e-5, atol=1e-5)
            if i == 0:  # what the pipeline feeds the transformer: cat([latent_ids, image_ids])
                ids = kontext_image_ids(e.grid, e.control_grids[:1])
                assert torch.equal(ids, torch.cat([latent_ids, control_ids]))


def test_mask_to_token_space(encoded, samples):
    m = torch.from_numpy(np.asarray(samples[0].mask, dtype=np.float32) / 255.0)
    assert torch.equal(encoded[0].mask, mask_to_tokens(m))
    assert encoded[0].mask.shape == (encoded[0].latents.shape[0],)
    assert 0 < encoded[0].mask.sum() < encoded[0].mask.numel()
    assert encoded[1].mask is None


def test_bad_samples_raise_user_errors(registry, trainer, encoders, model, rgb):
    from qflux.types import EditSample

    def enc(sample):
        return trainer.encode(encoders, [sample], model, False)

    with pytest.raises(UserError, match="'odd'.*multiples of 16"):
        enc(EditSample("odd", "x", rgb(40, 32, 0)))
    with pytest.raises(UserError, match="at most 3"):
        enc(EditSample("many", "x", rgb(32, 32, 0), [rgb(16, 16, i) for i in range(4)]))
    with pytest.raises(UserError, match="mask"):
        enc(EditSample("m", "x", rgb(32, 32, 0), mask=rgb(16, 16, 0).convert("L")))


def test_bfloat16_encoders_return_float32(registry, trainer, samples):
    model = ModelConfig(pretrained="builtin:tiny", dtype="bfloat16")
    encoders = trainer.load_encoders(model)
    assert encoders.text_encoder_2.dtype == torch.bfloat16 and encoders.vae.dtype == torch.bfloat16
    out = trainer.encode(encoders, samples[:1], model, False)
    e = out[0]
    assert e.latents.dtype == e.controls[0].dtype == e.prompt.hidden.dtype == e.prompt.pooled.dtype == torch.float32


# --------------------------------------------------------------------------- predict


def test_predict_equals_the_pipelines_transformer_call(
    registry, trainer, transformer, encoded, pipe, samples, model, gen
):
    e, s = encoded[0], samples[0]
    noisy = _noisy(e, 0.7)
    guided = model.model_copy(update={"options": {"guidance": 2.5}})
    pred = trainer.predict(transformer, _batch(e), noisy, guided)
    assert pred.shape == e.latents[None].shape

    # the way FluxKontextPipeline.__call__ calls the transformer
    _, image_latents, latent_ids, image_ids = _prepare(pipe, s.controls[0], gen, s.target.size)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=s.prompt, prompt_2=None, max_sequence_length=32)
    t = torch.tensor([0.7 * 1000.0])
    with torch.no_grad():
        ref = pipe.transformer(
            hidden_states=torch.cat([noisy.latents, image_latents], dim=1),
            timestep=t.expand(1).to(noisy.latents.dtype) / 1000,
            guidance=torch.full([1], 2.5, dtype=torch.float32).expand(1),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=torch.cat([latent_ids, image_ids]),
            return_dict=False,
        )[0][:, : noisy.latents.size(1)]
    torch.testing.assert_close(pred, ref, rtol=1e-4, atol=1e-5)
    # the guidance value reaches the transformer
    other = trainer.predict(transformer, _batch(e), noisy, model)
    assert not torch.allclose(pred, other)


def test_multi_control_ids_use_next_indices(registry, trainer, transformer, encoded, model):
    from qflux_kontext.packing import kontext_image_ids

    e = encoded[1]  # target 2x3 tokens, controls 3x4 and 1x2
    ids = kontext_image_ids(e.grid, e.control_grids)
    n, n1, n2 = 6, 12, 2
    assert ids.shape == (n + n1 + n2, 3)
    assert ids[:n, 0].eq(0).all() and ids[n : n + n1, 0].eq(1).all() and ids[n + n1 :, 0].eq(2).all()
    assert ids[n : n + n1, 1:].tolist()[:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]  # own (row, col) grid

    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    handle = transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        noisy = _noisy(e, 0.3)
        pred = trainer.predict(transformer, _batch(e), noisy, model)
    finally:
        handle.remove()
    assert pred.shape == (1, n, 64)
    assert torch.equal(seen["img_ids"], ids)
    assert seen["hidden_states"].shape == (1, n + n1 + n2, 64)
    assert torch.equal(seen["txt_ids"], torch.zeros(32, 3))
    # the second control matters
    batch = _batch(e)
    batch.controls[1] = torch.zeros_like(batch.controls[1])
    assert not torch.allclose(
        pred,
        trainer.predict(transformer, batch, noisy, model),
    )


def test_predict_is_differentiable_into_inputs(registry, trainer, transformer, encoded, model):
    e = encoded[2]
    noisy = _noisy(e, 0.5)
    noisy.latents.requires_grad_(True)
    pred = trainer.predict(transformer, _batch(e, controls=False), noisy, model)
    pred.square().mean().backward()
    assert noisy.latents.grad is not None and noisy.latents.grad.abs().sum() > 0


# --------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from qflux_kontext.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "kontext")


def test_saved_folder_loads_identically(registry, trainer, tiny_folder, encoders, transformer, samples, encoded):
    model = ModelConfig(pretrained=str(tiny_folder), dtype="float32")
    t2 = trainer.load_transformer(model)
    enc2 = trainer.load_encoders(model)
    assert type(t2).__name__ == "FluxTransformer2DModel" and not any(p.requires_grad for p in t2.parameters())
    assert enc2.max_sequence_length == 32 and enc2.source == str(tiny_folder)
    assert enc2.scheduler_config["use_dynamic_shifting"] is True
    out = trainer.encode(enc2, samples, model, True)
    for a, b in zip(out, encoded, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt.hidden, b.prompt.hidden)
        assert torch.equal(a.prompt.pooled, b.prompt.pooled) and torch.equal(
            a.empty_prompt.hidden, b.empty_prompt.hidden
        )
        assert all(torch.equal(x, y) for x, y in zip(a.controls, b.controls, strict=True))
    noisy = _noisy(encoded[0], 0.5)
    p1 = trainer.predict(transformer, _batch(encoded[0]), noisy, model)
    p2 = trainer.predict(t2, _batch(out[0]), noisy, model)
    assert torch.equal(p1, p2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_wrong_family_or_missing_component_is_a_user_error(registry, trainer, tiny_folder, tmp_path):
    def load(folder, stage="load_transformer"):
        return getattr(trainer, stage)(ModelConfig(pretrained=str(folder), dtype="float32"))

    wrong = _copy(tiny_folder, tmp_path / "qwen")
    cfg = wrong / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "QwenImageTransformer2DModel"}))
    with pytest.raises(UserError, match=r"qwen.*QwenImageTransformer2DModel.*FluxTransformer2DModel"):
        load(wrong)

    other = _copy(tiny_folder, tmp_path / "other")
    idx = other / "model_index.json"
    idx.write_text(json.dumps({**json.loads(idx.read_text()), "_class_name": "QwenImageEditPipeline"}))
    with pytest.raises(UserError, match="QwenImageEditPipeline"):
        load(other, "load_encoders")

    missing = _copy(tiny_folder, tmp_path / "novae")
    shutil.rmtree(missing / "vae")
    with pytest.raises(UserError, match=r"novae.*'vae'"):
        load(missing, "load_encoders")
    shutil.rmtree(missing / "tokenizer_2")
    (missing / "vae").mkdir()
    shutil.copy(tiny_folder / "vae" / "config.json", missing / "vae" / "config.json")
    with pytest.raises(UserError, match="tokenizer_2"):
        load(missing, "load_encoders")

    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nowhere")


# --------------------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def bundle(trainer, model, transformer, encoders):
    return ModelBundle(trainer=trainer, model=model, transformer=transformer, encoders=encoders)


def test_sample_size_and_determinism(registry, bundle, samples):
    req = SampleRequest(
        prompt="make it blue", controls=[samples[0].controls[0]], height=48, width=64, steps=2, seed=3, guidance=2.5
    )
    a = bundle.trainer.sample(bundle, req)
    b = bundle.trainer.sample(bundle, req)
    assert a.size == (64, 48) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c = bundle.trainer.sample(bundle, SampleRequest(**{**req.__dict__, "seed": 4}))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_sample_text_to_image_multi_control_and_cfg(registry, bundle, samples):
    t2i = bundle.trainer.sample(bundle, SampleRequest(prompt="a cat", height=32, width=48, steps=2))
    assert t2i.size == (48, 32)
    multi = SampleRequest(
        prompt="x",
        controls=list(samples[1].controls),
        height=32,
        width=32,
        steps=2,
        true_cfg=2.0,
        negative_prompt="blur",
    )
    img = bundle.trainer.sample(bundle, multi)
    assert img.size == (32, 32)
    with pytest.raises(UserError, match="multiples of 16"):
        bundle.trainer.sample(bundle, SampleRequest(prompt="x", height=40, width=32, steps=1))


@pytest.mark.parametrize("n_controls, true_cfg", [(0, 1.0), (1, 1.0), (1, 3.0)])
def test_own_denoising_loop_reproduces_the_pipeline(bundle, samples, n_controls, true_cfg):
    from qflux_kontext.sampling import sample

    req = SampleRequest(
        prompt="make it blue",
        controls=samples[1].controls[:n_controls],
        height=32,
        width=48,
        steps=3,
        seed=1,
        guidance=2.5,
        true_cfg=true_cfg,
        negative_prompt="red",
    )
    via_pipe = np.asarray(sample(bundle, req, loop=False)).astype(int)
    via_loop = np.asarray(sample(bundle, req, loop=True)).astype(int)
    assert np.abs(via_pipe - via_loop).max() <= 1


def test_sampling_leaves_training_state_alone(bundle, samples):
    from qflux_kontext.sampling import sample

    config = dict(bundle.encoders.scheduler_config)
    bundle.transformer.train()
    try:
        sample(bundle, SampleRequest(prompt="x", controls=samples[0].controls, height=32, width=32, steps=2))
        assert bundle.transformer.training
    finally:
        bundle.transformer.eval()
    assert dict(bundle.encoders.scheduler_config) == config
