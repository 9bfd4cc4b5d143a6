"""Resize planning: fixed, pixel budget and aspect buckets, with hand-computed sizes."""

from __future__ import annotations

import math

import pytest

from qflux.config.schema import DataConfig
from qflux.data import plan_control_size, plan_size, resize_mode
from qflux.data.resize import auto_buckets
from qflux.errors import ConfigError


def cfg(**kw) -> DataConfig:
    return DataConfig(path="builtin:shapes", **kw)


def test_mode_follows_the_form_of_resolution():
    assert resize_mode(cfg(resolution=512)) == "budget"
    assert resize_mode(cfg(resolution=[512, 768])) == "fixed"
    assert resize_mode(cfg(resolution=[[512, 512], [384, 640]])) == "buckets"
    assert resize_mode(cfg(resolution=512, resize="fixed")) == "fixed"


def test_fixed():
    # [h, w] = [64, 96]: every target becomes 96 wide, 64 high, whatever its own size
    for size in [(1000, 1000), (30, 200), (96, 64)]:
        assert plan_size(*size, cfg(resolution=[64, 96])) == (96, 64)
    assert plan_size(1024, 768, cfg(resolution=256, resize="fixed")) == (256, 256)


def test_budget():
    # 1024x768 at 512^2 = 262144 px: w = sqrt(262144 * 4/3) = 591.2 -> 592, h = sqrt(262144 * 3/4) = 443.4 -> 448
    assert plan_size(1024, 768, cfg(resolution=512)) == (592, 448)
    assert plan_size(300, 300, cfg(resolution=512)) == (512, 512)
    # 500x1000 at 65536 px: w = sqrt(32768) = 181.0 -> 176, h = sqrt(131072) = 362.0 -> 368
    assert plan_size(500, 1000, cfg(resolution=256)) == (176, 368)
    # budget from [h, w]: 64 * 96 = 6144 px; a square input: sqrt(6144) = 78.4 -> 80
    assert plan_size(50, 50, cfg(resolution=[64, 96], resize="budget")) == (80, 80)
    # an aspect beyond max_aspect (4) is clamped to it: 4:1 at 4096 px = 128 x 32
    assert plan_size(4000, 10, cfg(resolution=64)) == (128, 32)
    assert plan_size(10, 4000, cfg(resolution=64, max_aspect=2.0)) == (48, 96)  # 1:2 -> w 45.3, h 90.5


def test_buckets():
    buckets = [[512, 512], [384, 640], [640, 384]]  # [h, w]
    c = cfg(resolution=buckets)
    assert plan_size(1000, 600, c) == (640, 384)  # aspect 1.67 -> w 640, h 384
    assert plan_size(600, 1000, c) == (384, 640)
    assert plan_size(500, 520, c) == (512, 512)
    assert plan_size(2000, 100, c) == (640, 384)  # widest bucket


def test_generated_buckets_for_an_int_resolution():
    c = cfg(resolution=512, resize="buckets")
    buckets = auto_buckets(512, c.max_aspect)
    assert [512, 512] in [list(b) for b in buckets]
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert max(h, w) / min(h, w) <= c.max_aspect
        assert abs(h * w / 512**2 - 1) < 0.3
    w, h = plan_size(1024, 512, c)
    assert (w, h) == (704, 384)  # closest aspect to 2.0 among ~512^2 buckets: 704/384 = 1.83


def test_misfit_modes_are_config_errors():
    with pytest.raises(ConfigError, match="'budget' needs"):
        plan_size(10, 10, cfg(resolution=[[512, 512], [384, 640]], resize="budget"))
    with pytest.raises(ConfigError, match="'fixed' needs"):
        plan_size(10, 10, cfg(resolution=[[512, 512], [384, 640]], resize="fixed"))


def test_control_sizes_keep_their_own_aspect():
    c = cfg(resolution=512, control_resolution=256)
    assert plan_control_size(256, 256, c) == (256, 256)
    # 512x256 at 65536 px: w = sqrt(131072) = 362.0 -> 368, h = 181.0 -> 176
    assert plan_control_size(512, 256, c) == (368, 176)
    # without control_resolution: the target's planned area (80 * 48 = 3840 px), the control's own aspect
    c2 = cfg(resolution=64)
    assert plan_control_size(100, 100, c2, target=(80, 48)) == (64, 64)
    assert plan_control_size(300, 100, c2, target=(80, 48)) == (112, 32)  # w = 107.3 -> 112, h = 35.8 -> 32
    assert plan_control_size(100, 100, c2) == (64, 64)  # no target: the resolution's own area


@pytest.mark.parametrize("resolution", [64, [48, 80], [[32, 64], [64, 32], [48, 48]]])
def test_sides_are_multiples_of_16(resolution):
    c = cfg(resolution=resolution)
    for w in (17, 33, 100, 257, 1001):
        for h in (19, 64, 333, 999):
            pw, ph = plan_size(w, h, c)
            cw, ch = plan_control_size(w, h, c, target=(pw, ph))
            assert min(pw, ph, cw, ch) >= 16
            assert pw % 16 == ph % 16 == cw % 16 == ch % 16 == 0
            aspect = min(max(w / h, 1 / c.max_aspect), c.max_aspect)  # clamped to max_aspect
            assert abs(math.log(cw / ch) - math.log(aspect)) < 0.75  # controls keep their aspect (16-px steps)
