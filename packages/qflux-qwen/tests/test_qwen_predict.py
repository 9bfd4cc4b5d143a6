"""qflux_predict: the pipelines' transformer call, padding invariance, 2511's zero_cond_t."""

from __future__ import annotations

import pytest
import torch

from qflux.training.batching import collate
from qflux.types import EditSample, NoisyInput


@pytest.fixture(scope="module")
def encoded(variants, encoders, model_config, image):
    """Two plus samples with equal image grids and prompts of different length; one edit sample."""
    from qflux_qwen.encoding import encode_samples

    controls = [image(32, 32, 1), image(48, 32, 2)]
    samples = [
        EditSample(key="a", prompt="red", target=image(48, 32, 0), controls=controls),
        EditSample(key="b", prompt="make the big red circle a small blue square on the left", target=image(48, 32, 3),
                   controls=controls),
    ]
    plus = encode_samples(variants["qwen-edit-plus"], encoders, samples, model_config(), empty_prompt=False)
    edit = encode_samples(
        variants["qwen-edit"], encoders, [EditSample("e", "red", image(48, 32, 0), [image(32, 32, 1)])],
        model_config(), empty_prompt=False,
    )
    return {"plus": plus, "edit": edit}


def _noisy(batch, sigmas):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents.shape, generator=g)
    s = torch.tensor(sigmas)[:, None, None]
    return NoisyInput(latents=(1 - s) * batch.latents + s * noise, sigmas=torch.tensor(sigmas), target=noise - batch.latents)


def _manual(transformer, batch, noisy, mask=None):
    """The call of QwenImageEdit(Plus)Pipeline's denoising loop: timestep = t / 1000 with t = sigma * 1000."""
    t = noisy.sigmas * 1000
    shapes = [[(1, *batch.grid), *[(1, *g) for g in batch.control_grids]]] * batch.size
    out = transformer(
        hidden_states=torch.cat([noisy.latents, *batch.controls], dim=1),
        timestep=t / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=batch.prompt.hidden,
        img_shapes=shapes,
        return_dict=False,
    )[0]
    return out[:, : noisy.latents.size(1)]


@pytest.mark.parametrize("name", ["qwen-edit", "qwen-edit-plus"])
def test_predict_equals_pipeline_call(name, variants, transformers_, encoded):
    from qflux_qwen.predict import predict

    batch = collate(encoded["edit" if name == "qwen-edit" else "plus"][:1])
    noisy = _noisy(batch, [0.4])
    with torch.no_grad():
        out = predict(variants[name], transformers_[name], batch, noisy)
        expected = _manual(transformers_[name], batch, noisy)
    assert out.shape == batch.latents.shape
    assert torch.equal(out, expected)


def test_padded_batch_invariance(variants, transformers_, encoded):
    from qflux_qwen.predict import predict

    a, b = encoded["plus"]
    assert a.prompt.hidden.shape[0] < b.prompt.hidden.shape[0]
    batch = collate([a, b])
    assert batch.prompt.mask is not None and not bool(batch.prompt.mask.all())
    noisy = _noisy(batch, [0.3, 0.8])
    for name in ("qwen-edit-plus", "qwen-edit-2511"):
        with torch.no_grad():
            both = predict(variants[name], transformers_[name], batch, noisy)
            for i, sample in enumerate((a, b)):
                single = collate([sample])
                one = NoisyInput(noisy.latents[i : i + 1], noisy.sigmas[i : i + 1], noisy.target[i : i + 1])
                alone = predict(variants[name], transformers_[name], single, one)
                torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_2511_uses_zero_cond_t(plus_folder, variants, model_config, encoded):
    from diffusers import QwenImageTransformer2DModel

    from qflux_qwen.loading import load_transformer
    from qflux_qwen.predict import predict

    model = model_config(pretrained=str(plus_folder))
    plus = load_transformer(variants["qwen-edit-plus"], model)
    z = load_transformer(variants["qwen-edit-2511"], model)  # same weights, zero_cond_t forced on
    manual = QwenImageTransformer2DModel.from_pretrained(plus_folder, subfolder="transformer", zero_cond_t=True)
    batch = collate(encoded["plus"][:1])
    noisy = _noisy(batch, [0.6])
    with torch.no_grad():
        out_plus = predict(variants["qwen-edit-plus"], plus, batch, noisy)
        out_2511 = predict(variants["qwen-edit-2511"], z, batch, noisy)
        expected = _manual(manual, batch, noisy)
    assert not torch.allclose(out_plus, out_2511, atol=1e-4)
    assert torch.equal(out_2511, expected)
    with pytest.raises(RuntimeError, match="zero_cond_t"):
        predict(variants["qwen-edit-2511"], plus, batch, noisy)


def test_predict_backward_and_bfloat16(variants, transformers_, encoded):
    from qflux_qwen.predict import predict

    transformer = transformers_["qwen-edit-plus"]
    batch = collate(encoded["plus"])
    noisy = _noisy(batch, [0.2, 0.9])
    weight = transformer.proj_out.weight
    weight.requires_grad_(True)
    try:
        out = predict(variants["qwen-edit-plus"], transformer, batch, noisy)
        (out - noisy.target).pow(2).mean().backward()
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    half = batch.to("cpu", torch.bfloat16)
    noisy16 = NoisyInput(noisy.latents.bfloat16(), noisy.sigmas, noisy.target.bfloat16())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = predict(variants["qwen-edit-plus"], transformer, half, noisy16)
    assert out16.shape == noisy.latents.shape and torch.isfinite(out16.float()).all()
