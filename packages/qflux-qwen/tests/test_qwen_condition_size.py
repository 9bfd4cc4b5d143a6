"""Qwen condition sizes: training feeds the VAE and the VL encoder controls of the sizes the pipelines use.

References are the pipelines' own ``calculate_dimensions`` (both qwenimage modules) and what the real
``Qwen2VLProcessor`` receives while qflux encodes a sample (a spy on ``__call__``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data import FileImage, SampleRecord, condition_size, load_sample
from qflux_qwen.plugin import TRAINERS

RATIOS = [0.25, 0.3, 0.4, 0.5, 0.5625, 0.6, 0.667, 0.75, 0.8, 0.9, 1.0, 1.1, 1.25, 1.333, 1.5, 1.6, 1.778, 2.0, 2.35,
          2.5, 3.0, 4.0]
# (w, h) of user images, odd ones included
SIZES = [(280, 700), (700, 700), (1000, 700), (1920, 1080), (1080, 1920), (517, 389), (1750, 700)]


def photo(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8))


def test_vae_and_vl_sizes_are_the_pipelines(variants):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for ratio in RATIOS:
        w, h = 1000 * ratio, 1000
        assert condition_size(variants["qwen-edit"].condition_sizing, w, h) == edit.calculate_dimensions(
            1024 * 1024, ratio)[:2]
        for name in ("qwen-edit-plus", "qwen-edit-2511"):
            sizing = variants[name].condition_sizing
            assert condition_size(sizing, w, h) == plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, ratio)
            assert sizing.vl_area == plus.CONDITION_IMAGE_SIZE
    assert variants["qwen-edit"].condition_sizing.vl_area is None  # one image for VAE and VL encoder


@pytest.mark.parametrize("name", ["qwen-edit", "qwen-edit-plus"])
def test_data_stage_gives_the_pipelines_images(variants, tmp_path, name):
    """A control given whole: the VAE image and the VL image are the pipeline's, size and pixels."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from qflux_qwen.tiny import build_tiny_pipeline

    sizing = variants[name].condition_sizing
    processor = build_tiny_pipeline(name).image_processor
    for w, h in SIZES:
        photo(w, h).save(tmp_path / "c.png")
        ref = FileImage(tmp_path / "c.png")
        sample = load_sample(SampleRecord(key="s", prompt="p", target=None, controls=(ref,)),
                             DataConfig(path=str(tmp_path), resolution=64), sizing)
        vw, vh = plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, w / h)
        assert sample.controls[0].size == (vw, vh)
        assert np.array_equal(np.asarray(sample.controls[0]), np.asarray(processor.resize(photo(w, h), vh, vw)))
        if name == "qwen-edit":
            assert sample.vl_controls == []  # the VL encoder sees the control itself, as in the pipeline
        else:
            cw, ch = plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, w / h)
            assert sample.vl_controls[0].size == (cw, ch)
            assert np.array_equal(np.asarray(sample.vl_controls[0]), np.asarray(processor.resize(photo(w, h), ch, cw)))


class Seen(Exception):
    pass


@pytest.mark.parametrize(("name", "control_resolution", "vl_resolution", "vl"), [
    ("qwen-edit", None, None, (1248, 832)),  # calculate_dimensions(1024 * 1024, 1.5): QwenImageEditPipeline's
    ("qwen-edit-plus", None, None, (480, 320)),  # calculate_dimensions(384 * 384, 1.5)
    ("qwen-edit-plus", "target", None, (480, 320)),  # cheaper VAE controls leave the VL image as the pipeline's
    ("qwen-edit-plus", "target", 128, (160, 112)),  # data.vl_resolution: a 128 x 128 budget (sides of 16)
    ("qwen-edit", "target", None, (48, 32)),  # qwen-edit's VL sees the VAE image: the target's size here
    ("qwen-edit", "target", 512, (624, 416)),  # ... unless data.vl_resolution sizes it apart
])
def test_vl_encoder_receives_the_planned_image(variants, encoders, model_config, tmp_path, monkeypatch, name,
                                               control_resolution, vl_resolution, vl):
    from transformers import Qwen2VLProcessor

    from qflux_qwen.encoding import encode_prompt, encode_samples

    photo(96, 64).save(tmp_path / "c.png")
    ref = FileImage(tmp_path / "c.png")
    data = DataConfig(path=str(tmp_path), resolution=(32, 48), control_resolution=control_resolution,
                      vl_resolution=vl_resolution)
    sample = load_sample(SampleRecord(key="s", prompt="p", target=ref, controls=(ref,)), data,
                         variants[name].condition_sizing)
    received = []

    def spy(self, *args, images=None, **kwargs):
        received.extend(im.size for im in (images if isinstance(images, list) else [images]))
        raise Seen

    monkeypatch.setattr(Qwen2VLProcessor, "__call__", spy)
    with pytest.raises(Seen):
        if control_resolution == "target":  # the whole encode (cheap at the target's size)
            encode_samples(variants[name], encoders, [sample], model_config(), empty_prompt=False)
        else:
            encode_prompt(variants[name], encoders, sample.prompt, sample.controls, None, None, sample.vl_controls)
    assert received == [vl]


def test_sampling_gives_the_vl_encoder_the_requests_vl_images(variants, encoders, transformers_, model_config,
                                                             monkeypatch):
    from transformers import Qwen2VLProcessor

    from qflux.types import ModelBundle, SampleRequest
    from qflux_qwen.sampling import sample

    received = []

    def spy(self, *args, images=None, **kwargs):
        received.extend(im.size for im in images)
        raise Seen

    monkeypatch.setattr(Qwen2VLProcessor, "__call__", spy)
    variant = variants["qwen-edit-plus"]
    bundle = ModelBundle(trainer=TRAINERS[variant.name], model=model_config(), transformer=transformers_["qwen-edit-plus"],
                         encoders=encoders)
    request = SampleRequest(prompt="p", controls=[photo(48, 32)], vl_controls=[photo(480, 320)], height=32, width=48,
                            steps=1)
    with pytest.raises(Seen):
        sample(variant, bundle, request)
    assert received == [(480, 320)]
