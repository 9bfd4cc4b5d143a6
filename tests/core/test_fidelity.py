"""Edit-fidelity measurements on synthetic textured images with a known shift / zoom.

The images are drawn analytically (a sum of random Gaussian blobs evaluated at the moved coordinates), so a
shift or zoom is exact: no resampling of a pixel image stands between the truth and the measurement.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qflux.fidelity import (
    PSNR_CAP,
    estimate_alignment,
    mean_change,
    psnr,
    same_aspect,
    unedited_region,
)


def texture(w: int, h: int, dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0, seed: int = 0) -> np.ndarray:
    """``HxWx3`` in [0, 1]: the scene moved by (dx, dy) pixels and magnified by ``zoom`` about the centre."""
    rng = np.random.default_rng(seed)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (xs - cx - dx) / zoom + cx, (ys - cy - dy) / zoom + cy  # where each output pixel looks in the scene
    image = np.zeros((h, w, 3))
    for _ in range(250):
        px, py = rng.uniform(-0.3 * w, 1.3 * w), rng.uniform(-0.3 * h, 1.3 * h)
        s = rng.uniform(0.01, 0.05) * max(w, h)
        image += rng.uniform(-1, 1, 3) * np.exp(-((u - px) ** 2 + (v - py) ** 2) / (2 * s * s))[..., None]
    return np.clip(0.5 + 0.12 * image, 0, 1)  # one fixed scale: moved copies share the reference's intensities


@pytest.mark.parametrize("dx,dy", [(0, 0), (3, 0), (0, -3), (12, 0), (-9, 8), (1.5, -0.5)])
def test_known_shifts_are_measured_within_half_a_pixel(dx, dy):
    reference = texture(128, 96)
    found = estimate_alignment(reference, texture(128, 96, dx, dy))
    assert found is not None
    assert abs(found.dx - dx) <= 0.5 and abs(found.dy - dy) <= 0.5, found  # a flipped sign fails every nonzero
    assert abs(found.shift_px - math.hypot(dx, dy)) <= 0.5
    assert abs(found.zoom - 1.0) <= 0.01


@pytest.mark.parametrize("zoom", [1.0, 1.05, 0.95, 1.12])
def test_known_zooms_are_measured_within_a_hundredth(zoom):
    found = estimate_alignment(texture(128, 128), texture(128, 128, zoom=zoom))
    assert found is not None
    assert abs(found.zoom - zoom) <= 0.01, found  # an inverted zoom (1/z) misses 1.05 by 0.048
    assert found.shift_px <= 0.5


def test_shift_and_zoom_together_in_pixels_of_a_large_image():
    # measured at a reduced working size: the shift must come back in the moved image's own pixels
    found = estimate_alignment(texture(640, 480), texture(640, 480, dx=12, dy=-3, zoom=1.05))
    assert found is not None
    assert abs(found.zoom - 1.05) <= 0.01
    assert abs(found.dx - 12) <= 0.5 and abs(found.dy + 3) <= 0.5, found


def test_reference_of_another_size_is_resized_first():
    found = estimate_alignment(texture(256, 192, seed=3), texture(128, 96, dx=3, seed=3))
    assert found is not None and abs(found.dx - 3) <= 0.5 and abs(found.dy) <= 0.5, found


def test_shift_is_measured_outside_the_mask():
    """The edited region (the centre, 56% of the image) holds the unshifted scene: ignoring the mask would
    find 0 px; only the frame around it shows the shift."""
    reference = texture(128, 96)
    moved = texture(128, 96, dx=5, dy=-3)
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[12:84, 16:112] = 255
    moved[12:84, 16:112] = reference[12:84, 16:112]
    found = estimate_alignment(reference, moved, mask=mask)
    assert found is not None
    assert abs(found.dx - 5) <= 0.5 and abs(found.dy + 3) <= 0.5, found
    unmasked = estimate_alignment(reference, moved)
    assert unmasked is not None and unmasked.shift_px < 1  # the competing peak is real: the mask matters


def test_noisy_sample_still_measured():
    rng = np.random.default_rng(1)
    moved = np.clip(texture(128, 96, dx=-4, dy=2) + rng.normal(0, 0.03, (96, 128, 3)), 0, 1)
    found = estimate_alignment(texture(128, 96), moved)
    assert found is not None and abs(found.dx + 4) <= 0.5 and abs(found.dy - 2) <= 0.5, found


def test_uint8_pil_inputs_give_the_same_shift():
    from PIL import Image

    reference = Image.fromarray((texture(96, 96) * 255).round().astype(np.uint8))
    moved = Image.fromarray((texture(96, 96, dx=3) * 255).round().astype(np.uint8))
    found = estimate_alignment(reference, moved)
    assert found is not None and abs(found.dx - 3) <= 0.5 and abs(found.dy) <= 0.5


def test_flat_or_fully_masked_images_have_no_alignment():
    flat = np.full((64, 64, 3), 0.5)
    assert estimate_alignment(flat, flat) is None
    full = np.full((64, 64), 255, dtype=np.uint8)
    assert estimate_alignment(texture(64, 64), texture(64, 64), mask=full) is None


def test_unedited_psnr_counts_only_outside_the_mask():
    rng = np.random.default_rng(2)
    control = texture(64, 48)
    sample = control + rng.normal(0, 0.01, control.shape)  # unedited part: known noise
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 20:50] = 255
    sample[10:30, 20:50] = 0.0  # the edit: far from the control
    region = unedited_region(control, sample, mask)
    assert region.sum() == 48 * 64 - 20 * 30 and not region[15, 25]  # an inverted mask fails here
    expected = -10 * math.log10(float(((sample - control) ** 2)[region].mean()))
    assert psnr(control, sample, region) == pytest.approx(expected, abs=1e-9)
    assert 38 < expected < 42  # sigma 0.01: ~40 dB, far above the whole image's
    assert psnr(control, sample) < 25
    assert psnr(control, control) == PSNR_CAP
    assert psnr(control, sample, np.zeros((48, 64), dtype=bool)) is None


def test_without_a_mask_the_unedited_region_is_where_control_and_target_agree():
    control = texture(64, 48)
    target = control.copy()
    target[5:20, 5:25] = 0.0  # the edit
    target[30:40, 30:40] += 0.01  # below the tolerance: still "agree" (JPEG noise must not count as an edit)
    region = unedited_region(control, target)
    assert not region[5:20, 5:25].any() and region[30:40, 30:40].all()
    assert region.sum() == 48 * 64 - 15 * 20


def test_edit_change_is_the_mean_absolute_change_inside_the_region():
    control = texture(32, 32)
    sample = control.copy()
    sample[:16] = np.clip(control[:16] + 0.2, 0, 1)
    edited = np.zeros((32, 32), dtype=bool)
    edited[:16] = True
    expected = float(np.abs(sample[:16] - control[:16]).mean())
    assert mean_change(control, sample, edited) == pytest.approx(expected)
    assert mean_change(control, sample, ~edited) == 0.0  # outside: untouched
    assert mean_change(control, sample, np.zeros((32, 32), dtype=bool)) is None


def test_same_aspect():
    assert same_aspect((1024, 768), (512, 384)) and same_aspect((1000, 752), (512, 384))
    assert not same_aspect((512, 512), (512, 384))
