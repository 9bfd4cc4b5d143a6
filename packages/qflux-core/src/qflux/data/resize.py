"""Plan the training size of an image from its size and ``data.resolution`` / ``data.resize``.

Modes (``data.resize``; None derives it from the form of ``data.resolution``):

- ``fixed``: every target becomes ``[h, w]`` (an int ``r`` means ``r x r``), center-cropped to that aspect.
- ``budget``: keep the image's aspect with about ``r * r`` pixels (``[h, w]``: about ``h * w`` pixels); an
  aspect beyond ``data.max_aspect`` is clamped to it (the crop keeps the middle).
- ``buckets``: the bucket ``[h, w]`` of closest aspect ratio from the list; with an int ``r``, buckets of about
  ``r * r`` pixels are generated (sides multiples of 64, or 16 for small ``r``) up to ``data.max_aspect``.

Every side is a multiple of 16 (VAE factor 8 x 2x2 packing) and at least 16. Control images always keep their
own aspect with their own pixel budget: ``data.control_resolution ** 2``, else the target's planned area.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from qflux.config.schema import DataConfig
from qflux.errors import ConfigError

MULTIPLE = 16
ResizeMode = Literal["fixed", "budget", "buckets"]
Size = tuple[int, int]  # (width, height), PIL order


def resize_mode(data: DataConfig) -> ResizeMode:
    """``data.resize``, or the mode the form of ``data.resolution`` implies (int: budget, [h, w]: fixed, list: buckets)."""
    if data.resize is not None:
        return data.resize
    if isinstance(data.resolution, int):
        return "budget"
    if isinstance(data.resolution, tuple):
        return "fixed"
    return "buckets"


def round_side(x: float) -> int:
    """Nearest multiple of 16, at least 16."""
    return max(MULTIPLE, int(round(x / MULTIPLE)) * MULTIPLE)


def budget_size(width: int, height: int, area: float, max_aspect: float | None = None) -> Size:
    """Keep ``width / height`` (clamped to ``max_aspect``: the crop takes the middle) with about ``area``
    pixels; sides rounded to multiples of 16."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    if max_aspect is not None:
        aspect = min(max(aspect, 1 / max_aspect), max_aspect)
    return round_side(math.sqrt(area * aspect)), round_side(math.sqrt(area / aspect))


def closest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> Size:
    """The ``[h, w]`` bucket whose aspect ratio is closest (in log space) to ``width / height``; first wins ties."""
    if not buckets:
        raise ConfigError("data.resolution: the bucket list is empty")
    target = math.log(width / height)
    best = min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))
    return int(best[1]), int(best[0])


def auto_buckets(side: int, max_aspect: float) -> list[tuple[int, int]]:
    """Buckets ``[h, w]`` of about ``side * side`` pixels, aspect up to ``max_aspect``, sorted by aspect."""
    step = 64 if side >= 256 else MULTIPLE
    area = side * side
    out: set[tuple[int, int]] = set()
    w = step
    while w <= side * max_aspect:
        h = max(step, int(round(area / w / step)) * step)
        if max(w, h) / min(w, h) <= max_aspect:
            out.add((h, w))
        w += step
    out.add((side, side))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nominal_area(data: DataConfig) -> int:
    """Pixel count the resolution stands for (a bucket list: its largest bucket)."""
    res = data.resolution
    if isinstance(res, int):
        return res * res
    if isinstance(res, tuple):
        return res[0] * res[1]
    return max(h * w for h, w in res)


def plan_size(width: int, height: int, data: DataConfig) -> Size:
    """The ``(w, h)`` a target of ``width x height`` pixels is trained at."""
    mode = resize_mode(data)
    res = data.resolution
    if mode == "fixed":
        if isinstance(res, int):
            return res, res
        if isinstance(res, tuple):
            return int(res[1]), int(res[0])
        if len(res) == 1:
            return int(res[0][1]), int(res[0][0])
        raise ConfigError("data.resize: 'fixed' needs data.resolution as an int or [h, w], not a list of buckets")
    if mode == "budget":
        if isinstance(res, list) and len(res) != 1:
            raise ConfigError("data.resize: 'budget' needs data.resolution as an int or [h, w], not a list of buckets")
        return budget_size(width, height, nominal_area(data), data.max_aspect)
    # buckets
    if isinstance(res, int):
        return closest_bucket(width, height, auto_buckets(res, data.max_aspect))
    if isinstance(res, tuple):
        return int(res[1]), int(res[0])
    return closest_bucket(width, height, res)


def plan_control_size(width: int, height: int, data: DataConfig, target: Size | None = None) -> Size:
    """The ``(w, h)`` of a control image: its own aspect, ``control_resolution ** 2`` pixels, else the area
    of the planned ``target`` size, else the resolution's nominal area."""
    if data.control_resolution is not None:
        area = data.control_resolution**2
    elif target is not None:
        area = target[0] * target[1]
    else:
        area = nominal_area(data)
    return budget_size(width, height, area, data.max_aspect)
