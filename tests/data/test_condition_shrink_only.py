"""FLUX.2 condition sizing, ``ConditionSizing(shrink_only=True)``: a reference above 1024 x 1024 pixels is
shrunk to that area at its aspect, a smaller one keeps its size, then both sides are floored to 16 by a crop.

The reference is the pipelines' own code: the real ``Flux2Pipeline`` and ``Flux2KleinPipeline`` (built without
components) run ``__call__`` until "# 4. process images" hands the reference to ``image_processor.preprocess``
(a spy records the size, the mode and the tensor, then stops the call), and
``Flux2ImageProcessor._resize_to_target_area`` on real images for a wider sweep of sizes.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data import FileImage, SampleRecord, condition_size, load_sample, plan_control
from qflux.data.resize import FULL, calculate_dimensions, condition_crop, crop_box
from qflux.types import ConditionSizing, TrainerInfo

AREA = 1024 * 1024  # the pipelines' literal
MULTIPLE = 16  # vae_scale_factor * 2
SIZING = ConditionSizing(area=AREA, multiple=MULTIPLE, shrink_only=True)
INFO = TrainerInfo(name="shrink-only", family="test", description="a FLUX.2-like trainer",
                   pipeline="diffusers.Flux2KleinPipeline", condition_sizing=SIZING)

# (w, h): above and below 1024^2 (and at it), odd sides, up to the pipelines' 8:1 limit, near-threshold areas
SIZES = [(1536, 1024), (1024, 1536), (1920, 1080), (1080, 1920), (4032, 3024), (3000, 2000), (1025, 1025),
         (1024, 1024), (1024, 1025), (1025, 1024), (1023, 1023), (1049, 1000), (2049, 513), (513, 2049),
         (4096, 512), (512, 4096), (577, 4001), (2897, 363), (1448, 725), (1201, 999), (3333, 1111),
         (517, 389), (389, 517), (700, 700), (1000, 700), (280, 700), (100, 77), (64, 64), (64, 512), (512, 64),
         (1023, 1025), (999, 1001)]


class Stop(Exception):
    pass


def photo(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x * 7 + y * 3) % 256], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def pipes():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    return [cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
            for cls in (Flux2Pipeline, Flux2KleinPipeline)]


def pipeline_condition(pipe, image: Image.Image) -> dict:
    """What ``pipe.__call__`` hands ``image_processor.preprocess`` for a reference ``image``: ``size`` (w, h),
    ``resize_mode`` and ``tensor``, the preprocessed image it goes on to encode."""
    import torch

    processor = pipe.image_processor
    real = processor.preprocess
    seen: dict = {}

    def spy(img, height=None, width=None, resize_mode="default", **kwargs):
        seen.update(size=(width, height), resize_mode=resize_mode,
                    tensor=real(img, height=height, width=width, resize_mode=resize_mode, **kwargs))
        raise Stop

    processor.preprocess = spy
    try:
        pipe(image=image, prompt_embeds=torch.zeros(1, 4, 8), guidance_scale=1.0, num_inference_steps=1)
    except Stop:
        pass
    finally:
        del processor.preprocess
    return seen


def test_condition_size_is_what_the_pipelines_give(pipes):
    for pipe in pipes:
        assert pipe.vae_scale_factor * 2 == MULTIPLE
        for w, h in SIZES:
            seen = pipeline_condition(pipe, Image.new("RGB", (w, h)))
            assert seen["resize_mode"] == "crop"
            assert condition_size(SIZING, w, h) == seen["size"], (type(pipe).__name__, w, h)


def test_condition_size_follows_resize_to_target_area():
    """A wider sweep: the pipelines' step 4 on real images of random sizes (aspects up to 8:1, up to ~6 MP)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    rng = random.Random(0)
    sizes = []
    while len(sizes) < 150:
        w, h = rng.randint(64, 3000), rng.randint(64, 3000)
        if max(w / h, h / w) <= 8:
            sizes.append((w, h))
    sizes += [(1024 + d, 1024 - d) for d in range(0, 40, 3)] + [(1048, 1001), (1001, 1048), (1049, 1000)]
    for w, h in sizes:
        img = Image.new("L", (w, h))
        if w * h > AREA:  # as Flux2Pipeline.__call__ / Flux2KleinPipeline.__call__
            img = Flux2ImageProcessor._resize_to_target_area(img, AREA)
        iw, ih = img.size
        expected = (iw // MULTIPLE) * MULTIPLE, (ih // MULTIPLE) * MULTIPLE
        assert condition_size(SIZING, w, h) == expected, (w, h)


def test_a_small_image_is_not_enlarged():
    assert condition_size(SIZING, 517, 389) == (512, 384)
    assert condition_size(SIZING, 64, 64) == (64, 64)
    assert condition_size(SIZING, 1024, 1024) == (1024, 1024)  # exactly the area: left alone
    assert condition_size(SIZING, 300, 2000) == (288, 2000)
    for w, h in SIZES:
        if w * h <= AREA:
            assert condition_size(SIZING, w, h) == (w // 16 * 16, h // 16 * 16)
    # the other rule at the same area enlarges it
    assert calculate_dimensions(AREA, 517 / 389) == (1184, 896)


def test_the_control_box_is_the_pipelines_crop():
    data = DataConfig(path=".", resolution=64)
    # 1536x1024 is shrunk to int(1536 s) x int(1024 s) = 1254x836, then cropped to 1248x832 at (3, 2)
    placed = plan_control(1536, 1024, data, None, SIZING)
    assert placed.size == (1248, 832)
    assert placed.box == pytest.approx((3 / 1254, 2 / 836, 1251 / 1254, 834 / 836))
    # a small image: cropped in its own pixels, (517 - 512) // 2 = 2 and (389 - 384) // 2 = 2
    placed = plan_control(517, 389, data, None, SIZING)
    assert placed.size == (512, 384)
    assert placed.box == pytest.approx((2 / 517, 2 / 389, 514 / 517, 386 / 389))
    assert plan_control(1024, 768, data, None, SIZING).box == FULL  # nothing to floor
    assert condition_crop(SIZING, 1024, 768) == FULL


def assert_same_image(ours, theirs, shrunk: bool, what) -> None:
    """Preprocessed tensors (in [-1, 1]) equal: exactly for an image the pipeline only crops; for a shrunk one
    the geometry is the pipeline's but PIL's LANCZOS with a ``box`` (qflux's one step) and resize-then-crop (the
    pipeline's two) round a few values differently: at most 2 levels of 255, in well under 1 % of the values."""
    assert ours.shape == theirs.shape, what
    levels = ((ours - theirs).abs() * 127.5).round()
    if not shrunk:
        assert levels.max().item() == 0, what
    else:
        assert levels.max().item() <= 2, what
        assert (levels > 0).float().mean().item() < 0.01, what
        assert abs((ours - theirs).mean().item()) < 1e-4, what  # no shift: differences are rounding noise


@pytest.mark.parametrize("size", [(1536, 1024), (4032, 3024), (1201, 999), (2897, 363), (517, 389), (389, 517),
                                  (1000, 700), (577, 4001), (100, 77), (1024, 1024), (1920, 1080)])
def test_data_stage_control_equals_the_pipelines_tensor(pipes, tmp_path, size):
    """A control given whole, loaded for a shrink_only trainer (``data.max_aspect: 8``, the pipelines' own
    limit, so qflux keeps the whole frame): preprocessed, it is the tensor the pipelines encode."""
    w, h = size
    photo(w, h).save(tmp_path / "c.png")
    sample = load_sample(SampleRecord(key="s", prompt="p", target=None, controls=(FileImage(tmp_path / "c.png"),)),
                         DataConfig(path=str(tmp_path), resolution=64, max_aspect=8), INFO.condition_sizing)
    control = sample.controls[0]
    for pipe in pipes:
        seen = pipeline_condition(pipe, photo(w, h))
        assert control.size == seen["size"]
        ours = pipe.image_processor.preprocess(control, height=control.height, width=control.width,
                                               resize_mode="crop")
        assert_same_image(ours, seen["tensor"], w * h > AREA, (type(pipe).__name__, size))


def test_data_stage_with_a_target_of_the_same_frame(pipes, tmp_path):
    """An edit pair: the control shares the target's box (here the full 3:2 frame: at a 512 px budget the target
    is 624x416) and gets the pipeline's reference, not the target's size."""
    photo(1536, 1024).save(tmp_path / "t.png")
    ref = FileImage(tmp_path / "t.png")
    sample = load_sample(SampleRecord(key="s", prompt="p", target=ref, controls=(ref,)),
                         DataConfig(path=str(tmp_path), resolution=512), INFO.condition_sizing)
    assert sample.target.size == (624, 416) and sample.controls[0].size == (1248, 832)
    seen = pipeline_condition(pipes[1], photo(1536, 1024))
    ours = pipes[1].image_processor.preprocess(sample.controls[0], height=832, width=1248, resize_mode="crop")
    assert_same_image(ours, seen["tensor"], True, "pair")


def test_other_modes_and_rules_are_unchanged():
    data = DataConfig(path=".", resolution=64)
    # control_resolution "target" / an int: the rule is not applied, the box is the control's own
    for control_resolution, size in (("target", (80, 48)), (512, (624, 416))):
        d = DataConfig(path=".", resolution=64, control_resolution=control_resolution)
        placed = plan_control(1536, 1024, d, None, SIZING)
        assert placed.box == crop_box(1536, 1024, 1.5) == FULL
        if control_resolution == 512:
            assert placed.size == size
    # the Qwen and Kontext rules resize the whole box
    qwen = ConditionSizing(area=AREA, multiple=32)
    kontext = ConditionSizing(preferred=((1248, 832), (1024, 1024)), multiple=16, input_multiple=16)
    assert not qwen.shrink_only and not ConditionSizing().shrink_only
    for sizing in (qwen, kontext):
        assert condition_crop(sizing, 1537, 1023) == FULL
        assert plan_control(1537, 1023, data, None, sizing).box == FULL
    assert condition_size(qwen, 517, 389) == calculate_dimensions(AREA, 517 / 389)
    assert condition_size(kontext, 1537, 1023) == (1248, 832)
    assert math.isclose(1248 / 832, 1.5)


def test_shrink_only_excludes_the_other_rules_inputs():
    with pytest.raises(ValueError, match="shrink_only"):
        ConditionSizing(shrink_only=True, preferred=((1024, 1024),))
    with pytest.raises(ValueError, match="shrink_only"):
        ConditionSizing(shrink_only=True, input_multiple=16)


def test_a_control_in_the_targets_fractional_box():
    """A control of the target's frame at another pixel size shares the target's crop box (fractional pixel
    extent): the rule reads its floored pixels, the crop stays inside the target's box."""
    from qflux.data.resize import plan_target

    data = DataConfig(path=".", resolution=(512, 640))  # fixed 5:4: the 3:2 target's sides are cut
    target = plan_target(3072, 2048, data)
    placed = plan_control(3000, 2000, data, target, SIZING)
    assert placed.aligned
    (bx0, by0, bx1, by1), (x0, y0, x1, y1) = target.box, placed.box
    assert bx0 <= x0 < x1 <= bx1 and by0 <= y0 < y1 <= by1
    assert placed.size == condition_size(SIZING, *plan_control(3000, 2000, data, target, None).extent)
    # the box is 5/6 of 3000 px wide (a float near 2500) x 2000: read as 2500 x 2000, shrunk to 1144 x 915
    assert plan_control(3000, 2000, data, target, None).extent == pytest.approx((2500, 2000))
    assert placed.size == (1136, 912)
