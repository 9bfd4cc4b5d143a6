"""qflux_encode equals what QwenImageEditPipeline / QwenImageEditPlusPipeline compute for the same inputs.

The pipelines' ``__call__`` resizes every condition image to about 1 MP before encoding, so the comparison
calls their own ``encode_prompt`` and ``prepare_latents`` on the pre-sized images, with the VL copies of the
plus pipeline made exactly as its ``__call__`` makes them (``calculate_dimensions(CONDITION_IMAGE_SIZE, ratio)``
then ``image_processor.resize``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.errors import UserError
from qflux.types import EditSample


def _pipeline_latents(pipe, images):
    """The pipeline's packed image latents for ``images`` preprocessed at their own size, as __call__ does."""
    tensors = [pipe.image_processor.preprocess(im, im.height, im.width).unsqueeze(2) for im in images]
    images = tensors if len(tensors) > 1 else tensors[0]  # the edit pipeline takes one tensor, plus a list
    _, latents = pipe.prepare_latents(images, 1, pipe.latent_channels, 32, 32, torch.float32, "cpu", None)
    return latents


def _img_shapes_like_pipeline(pipe, height, width, controls):
    f = pipe.vae_scale_factor
    return [[(1, height // f // 2, width // f // 2), *[(1, c.height // f // 2, c.width // f // 2) for c in controls]]]


def test_edit_matches_pipeline(variants, encoders, model_config, image):
    from qflux_qwen.encoding import encode_samples
    from qflux_qwen.predict import img_shapes

    variant = variants["qwen-edit"]
    target, control = image(48, 32, 0), image(32, 48, 1)
    sample = EditSample(key="s", prompt="make the red circle blue", target=target, controls=[control])
    out = encode_samples(variant, encoders, [sample], model_config(), empty_prompt=True)[0]
    pipe = encoders.pipeline("QwenImageEditPipeline")

    embeds, mask = pipe.encode_prompt("make the red circle blue", image=control, device="cpu")
    assert mask is None  # all ones: the pipeline drops it
    assert torch.equal(out.prompt.hidden, embeds[0].float())
    assert out.prompt.mask.dtype == torch.long and bool(out.prompt.mask.all())
    assert out.prompt.pooled is None
    empty, _ = pipe.encode_prompt("", image=control, device="cpu")
    assert torch.equal(out.empty_prompt.hidden, empty[0].float())
    assert out.prompt.hidden.dtype == out.latents.dtype == torch.float32

    assert torch.equal(out.controls[0], _pipeline_latents(pipe, [control])[0])
    assert torch.equal(out.latents, _pipeline_latents(pipe, [target])[0])
    assert out.latents.shape == (2 * 3, 64) and out.grid == (2, 3) and out.control_grids == [(3, 2)]
    assert img_shapes(out.grid, out.control_grids, 1) == _img_shapes_like_pipeline(pipe, 32, 48, [control])
    assert out.mask is None


def test_plus_matches_pipeline(variants, encoders, model_config, image):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    from qflux_qwen.encoding import encode_samples
    from qflux_qwen.predict import img_shapes

    controls = [image(32, 32, 1), image(64, 32, 2)]
    sample = EditSample(key="s", prompt="put picture 2 on picture 1", target=image(32, 32, 0), controls=controls)
    out = encode_samples(variants["qwen-edit-plus"], encoders, [sample], model_config(), empty_prompt=False)[0]
    pipe = encoders.pipeline("QwenImageEditPlusPipeline")

    vl = []
    for c in controls:  # QwenImageEditPlusPipeline.__call__, step 3
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, c.width / c.height)
        vl.append(pipe.image_processor.resize(c, h, w))
    assert [im.size for im in vl] == [(384, 384), (544, 256)]
    embeds, _ = pipe.encode_prompt("put picture 2 on picture 1", image=vl, device="cpu")
    assert torch.equal(out.prompt.hidden, embeds[0].float())
    assert out.empty_prompt is None

    latents = _pipeline_latents(pipe, controls)[0]
    assert torch.equal(torch.cat(out.controls), latents)
    assert [c.shape[0] for c in out.controls] == [4, 8] and out.control_grids == [(2, 2), (2, 4)]
    assert img_shapes(out.grid, out.control_grids, 1) == _img_shapes_like_pipeline(pipe, 32, 32, controls)


def test_plus_template_has_one_picture_per_control(variants, encoders):
    from qflux_qwen.encoding import encode_prompt

    variant = variants["qwen-edit-plus"]
    one, _ = encode_prompt(variant, encoders, "x", [Image.new("RGB", (32, 32))])
    two, _ = encode_prompt(variant, encoders, "x", [Image.new("RGB", (32, 32))] * 2)
    text_only, _ = encode_prompt(variant, encoders, "x", [])
    # 384x384 VL copy: 28x28 patches, merged 2x2 -> 196 image tokens (+ "Picture i: " and vision start/end)
    assert two.shape[1] - one.shape[1] == one.shape[1] - text_only.shape[1] > 196


def test_mask_and_text_to_image(variants, encoders, model_config, image):
    from qflux.loss import mask_to_tokens
    from qflux_qwen.encoding import encode_samples

    pixels = np.zeros((32, 64), dtype=np.uint8)
    pixels[:, :20] = 255
    mask = Image.fromarray(pixels, "L")
    sample = EditSample(key="t2i", prompt="a red square", target=image(64, 32, 0), mask=mask)
    out = encode_samples(variants["qwen-edit"], encoders, [sample], model_config(), empty_prompt=False)[0]
    expected = mask_to_tokens(torch.from_numpy(pixels.astype(np.float32) / 255.0))
    assert torch.equal(out.mask, expected)
    assert out.mask.tolist() == [1.0, 0.5, 0.0, 0.0] * 2  # per 16 px token column: all edited, max over its 8 px latent pixels 4/8, none, none
    assert out.controls == [] and out.control_grids == []
    # text-to-image: the same system prompt without a picture (the plus template with image=None)
    embeds, _ = encoders.pipeline("QwenImageEditPlusPipeline").encode_prompt("a red square", image=None, device="cpu")
    assert torch.equal(out.prompt.hidden, embeds[0].float())


def test_bfloat16_encoders_give_float32(variants, model_config, image):
    from qflux_qwen.encoding import encode_samples
    from qflux_qwen.loading import load_encoders

    model = model_config(dtype="bfloat16")
    variant = variants["qwen-edit"]
    encoders = load_encoders(variant, model)
    assert encoders.vae.dtype == encoders.text_encoder.dtype == torch.bfloat16
    sample = EditSample(key="s", prompt="x", target=image(32, 32, 0), controls=[image(32, 32, 1)])
    out = encode_samples(variant, encoders, [sample], model, empty_prompt=True)[0]
    for t in (out.latents, out.controls[0], out.prompt.hidden, out.empty_prompt.hidden):
        assert t.dtype == torch.float32 and t.device.type == "cpu"


def test_bad_samples(variants, encoders, model_config, image):
    from qflux_qwen.encoding import encode_samples

    two = EditSample(key="k", prompt="x", target=image(32, 32, 0), controls=[image(32, 32, 1)] * 2)
    with pytest.raises(UserError, match="at most 1"):
        encode_samples(variants["qwen-edit"], encoders, [two], model_config(), empty_prompt=False)
    odd = EditSample(key="odd", prompt="x", target=image(40, 32, 0))
    with pytest.raises(UserError, match="multiples of 16"):
        encode_samples(variants["qwen-edit-plus"], encoders, [odd], model_config(), empty_prompt=False)
