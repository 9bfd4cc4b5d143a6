"""Kontext condition sizes: training feeds a control at the size FluxKontextPipeline gives it at inference.

The pipeline's own code is the reference: the real tiny ``FluxKontextPipeline`` runs until it resizes the
control (a spy on its ``image_processor.resize`` records the image and stops it), for a sweep of aspects.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data import FileImage, SampleRecord, condition_size, load_sample
from qflux_kontext.plugin import CONDITION_SIZING, PREFERRED_KONTEXT_RESOLUTIONS, TRAINER

# (w, h) of user images: portrait to 2.5:1, odd sizes (the pipeline floors them to 16 before the aspect)
SIZES = [(280, 700), (330, 700), (420, 700), (500, 700), (560, 700), (640, 700), (700, 700), (720, 700),
         (770, 700), (820, 700), (910, 700), (1000, 700), (1080, 700), (1250, 700), (1400, 700), (1750, 700),
         (1920, 1080), (1080, 1920), (999, 1001), (517, 389), (1203, 797)]


class Picked(Exception):
    pass


@pytest.fixture(scope="module")
def pipe():
    from qflux_kontext.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


def pipeline_resized(pipe, image: Image.Image) -> Image.Image:
    """The control image as ``FluxKontextPipeline.__call__`` (defaults, i.e. ``_auto_resize=True``) resizes it."""
    real = pipe.image_processor.resize
    seen = {}

    def spy(img, height, width, *args, **kwargs):
        seen["image"] = real(img, height, width, *args, **kwargs)
        raise Picked

    pipe.image_processor.resize = spy
    try:
        pipe(image=image, prompt="x", num_inference_steps=1, max_sequence_length=16)
    except Picked:
        pass
    finally:
        del pipe.image_processor.resize
    return seen["image"]


def photo(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8))


def test_preferred_resolutions_are_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS as theirs

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == list(theirs)
    assert TRAINER.info.condition_sizing is CONDITION_SIZING


def test_condition_size_is_what_the_pipeline_picks(pipe):
    assert pipe.image_processor.config.vae_scale_factor == CONDITION_SIZING.input_multiple
    for w, h in SIZES:
        image = photo(w, h)
        assert condition_size(CONDITION_SIZING, w, h) == pipeline_resized(pipe, image).size, (w, h)


def test_data_stage_control_equals_the_pipelines_image(pipe, tmp_path):
    """Default rule, a control given whole (no target, or a target whose planned size keeps the full frame):
    the control is pixel for pixel the image the pipeline would encode."""
    for w, h in [(1000, 700), (1920, 1080), (517, 389), (280, 700)]:
        photo(w, h).save(tmp_path / "c.png")
        ref = FileImage(tmp_path / "c.png")
        sample = load_sample(SampleRecord(key="s", prompt="p", target=None, controls=(ref,)),
                             DataConfig(path=str(tmp_path), resolution=64), TRAINER.info.condition_sizing)
        theirs = pipeline_resized(pipe, photo(w, h))
        assert sample.controls[0].size == theirs.size
        assert np.array_equal(np.asarray(sample.controls[0]), np.asarray(theirs))
    photo(1536, 1024).save(tmp_path / "t.png")  # at 512 px budget the target is 624x416: the same 3:2 frame
    ref = FileImage(tmp_path / "t.png")
    sample = load_sample(SampleRecord(key="s", prompt="p", target=ref, controls=(ref,)),
                         DataConfig(path=str(tmp_path), resolution=512), TRAINER.info.condition_sizing)
    theirs = pipeline_resized(pipe, photo(1536, 1024))
    assert sample.target.size == (624, 416) and sample.controls[0].size == theirs.size == (1248, 832)
    assert np.array_equal(np.asarray(sample.controls[0]), np.asarray(theirs))


def test_default_rule_encodes_a_1mp_control(tmp_path, model):
    """The default (pipeline) rule end to end on the tiny model: the encoded control has the pipeline's grid."""
    from qflux_kontext.encoding import encode_samples
    from qflux_kontext.loading import load_encoders

    photo(96, 64).save(tmp_path / "t.png")
    ref = FileImage(tmp_path / "t.png")
    sample = load_sample(SampleRecord(key="s", prompt="p", target=ref, controls=(ref,)),
                         DataConfig(path=str(tmp_path), resolution=(32, 48)), TRAINER.info.condition_sizing)
    assert sample.controls[0].size == (1248, 832) and sample.target.size == (48, 32)
    out = encode_samples(load_encoders(model), [sample], model, empty_prompt=False)[0]
    assert out.control_grids == [(52, 78)] and out.controls[0].shape[0] == 52 * 78 and out.grid == (2, 3)
