"""Plan the training size of an image from its size and ``data.resolution`` / ``data.resize``.

Modes (``data.resize``; None derives it from the form of ``data.resolution``):

- ``fixed``: every target becomes ``[h, w]`` (an int ``r`` means ``r x r``), center-cropped to that aspect.
- ``budget``: keep the image's aspect with about ``r * r`` pixels (``[h, w]``: about ``h * w`` pixels); an
  aspect beyond ``data.max_aspect`` is clamped to it (the crop keeps the middle).
- ``buckets``: the bucket ``[h, w]`` of closest aspect ratio from the list; with an int ``r``, buckets of about
  ``r * r`` pixels are generated (sides multiples of 64, or 16 for small ``r``) up to ``data.max_aspect``.

Every side is a multiple of 16 (VAE factor 8 x 2x2 packing) and at least 16.

One geometry per sample: the target's crop box (``plan_target``, in normalised source coordinates) is also
the crop box of every control of the same aspect (``shares_target_geometry``) and of the mask, so an aligned
edit pair stays pixel-aligned whatever the mode. Only a control whose aspect really differs keeps its own
aspect (its own centred box, clamped to ``data.max_aspect``). The control's final size (``plan_control``):

- ``data.control_resolution: null``: what the trainer's pipeline feeds at inference (``ConditionSizing``,
  ``condition_size``): Kontext's preferred-resolution snap and Qwen's ``calculate_dimensions`` resize the
  whole box to a size near their area; FLUX.2's ``shrink_only`` shrinks a box above its area to that area
  (never enlarges a smaller one) and floors the sides to 16 by a centre crop of the box
  (``condition_crop``), as its pipeline does; a trainer without a rule: as ``"target"``;
- ``"target"``: the target's planned size (an own-aspect control: its aspect at the target's area);
- an int ``r``: its box's aspect with about ``r * r`` pixels.

A vision-language encoder's copy (``plan_vl``) is cut from the same box at ``data.vl_resolution`` or the
rule's ``vl_area``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qflux.config.resolution import MULTIPLE, ResizeMode, Size
from qflux.config.resolution import auto_buckets as auto_buckets  # re-exported (qflux.data.resize.auto_buckets)
from qflux.config.schema import DataConfig
from qflux.errors import ConfigError
from qflux.types import ConditionSizing


def resize_mode(data: DataConfig) -> ResizeMode:
    """``data.resize``, or the mode the form of ``data.resolution`` implies (int: budget, [h, w]: fixed, list: buckets)."""
    return data.resolution_spec.mode


def round_side(x: float, multiple: int = MULTIPLE) -> int:
    """Nearest multiple of ``multiple`` (16), at least ``multiple``."""
    return max(multiple, int(round(x / multiple)) * multiple)


def budget_size(width: float, height: float, area: float, max_aspect: float | None = None,
                multiple: int = MULTIPLE) -> Size:
    """Keep ``width / height`` (clamped to ``max_aspect``: the crop takes the middle) with about ``area``
    pixels; sides rounded to multiples of ``multiple`` (16; a control: its trainer pipeline's multiple)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    if max_aspect is not None:
        aspect = min(max(aspect, 1 / max_aspect), max_aspect)
    return round_side(math.sqrt(area * aspect), multiple), round_side(math.sqrt(area / aspect), multiple)


def closest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> Size:
    """The ``[h, w]`` bucket whose aspect ratio is closest (in log space) to ``width / height``; first wins ties."""
    if not buckets:
        raise ConfigError("data.resolution: the bucket list is empty")
    target = math.log(width / height)
    best = min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))
    return int(best[1]), int(best[0])


def nominal_area(data: DataConfig) -> int:
    """Pixel count the resolution stands for (a bucket list: its largest bucket)."""
    return data.resolution_spec.nominal_area


def plan_size(width: int, height: int, data: DataConfig) -> Size:
    """The ``(w, h)`` a target of ``width x height`` pixels is trained at."""
    spec = data.resolution_spec
    if spec.mode == "fixed":
        if spec.single is None:
            raise ConfigError("data.resize: 'fixed' needs data.resolution as an int or [h, w], not a list of buckets")
        return spec.single
    if spec.mode == "budget":
        if spec.single is None:
            raise ConfigError("data.resize: 'budget' needs data.resolution as an int or [h, w], not a list of buckets")
        return budget_size(width, height, spec.nominal_area, data.max_aspect)
    # buckets: one [h, w] is its own bucket; an int generates them, a list is them
    if spec.form == "hw" and spec.single is not None:
        return spec.single
    return closest_bucket(width, height, spec.buckets(data.max_aspect))


def plan_control_size(width: int, height: int, data: DataConfig, target: Size | None = None) -> Size:
    """The ``(w, h)`` of a control that keeps its own aspect: ``control_resolution ** 2`` pixels (an int),
    else the area of the planned ``target`` size, else the resolution's nominal area."""
    if isinstance(data.control_resolution, int):
        area = data.control_resolution**2
    elif target is not None:
        area = target[0] * target[1]
    else:
        area = nominal_area(data)
    return budget_size(width, height, area, data.max_aspect)


def default_size(data: DataConfig) -> Size:
    """The ``(w, h)`` of an output with no image to plan from: the square budget, the fixed size, or the
    squarest bucket."""
    return data.resolution_spec.default_size


# --------------------------------------------------------------------------- one geometry per sample

Box = tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the source's width/height
FULL: Box = (0.0, 0.0, 1.0, 1.0)
# A control counts as the target's frame when its aspect is within 1 % (log) plus the rounding of one pixel on
# either image's shorter side: an edit exported at another size (1024x683 vs 1000x667) still shares it.
ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Placement:
    """Where an image of a sample comes from and what it becomes: ``box`` of its source, resized to ``size``."""

    source: Size  # (w, h) of the source image
    box: Box
    size: Size
    aligned: bool = True  # False: a control of another aspect, in its own geometry

    @property
    def extent(self) -> tuple[float, float]:
        """Width and height in source pixels that the box covers."""
        return (self.box[2] - self.box[0]) * self.source[0], (self.box[3] - self.box[1]) * self.source[1]


def shares_target_geometry(target_wh: Size, control_wh: Size) -> bool:
    """True when a control of ``control_wh`` source pixels has the target's aspect (within the tolerance):
    it then gets exactly the target's crop box. Pure; ``qflux data check`` lists the controls for which
    it is False."""
    (tw, th), (cw, ch) = target_wh, control_wh
    slack = ASPECT_TOLERANCE + 1 / min(tw, th) + 1 / min(cw, ch)
    return abs(math.log((cw * th) / (ch * tw))) <= slack


def crop_box(width: int, height: int, aspect: float) -> Box:
    """The centred box of ``aspect`` (w / h) inside a ``width x height`` image, normalised: the crop of
    ``PIL.ImageOps.fit``."""
    source = width / height
    if aspect > source:  # narrower source: full width, cut top and bottom
        h = source / aspect
        return 0.0, (1 - h) / 2, 1.0, (1 + h) / 2
    if aspect < source:  # wider source: full height, cut the sides
        w = aspect / source
        return (1 - w) / 2, 0.0, (1 + w) / 2, 1.0
    return FULL


def plan_target(width: int, height: int, data: DataConfig) -> Placement:
    """The target's size (``plan_size``) and the centred box of that aspect in its source."""
    size = plan_size(width, height, data)
    return Placement((width, height), crop_box(width, height, size[0] / size[1]), size)


def calculate_dimensions(area: float, ratio: float, multiple: int = 32) -> Size:
    """The qwenimage pipelines' ``calculate_dimensions``: ``w = sqrt(area * ratio)``, ``h = w / ratio``, each
    rounded to ``multiple`` with Python's ``round`` (half to even), at least ``multiple``."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def _pixels(x: float) -> int:
    """A side in whole pixels as the pipeline would get it (a box's float side: 63.99999 is 64, not 63)."""
    return max(1, math.floor(round(x, 6)))


def shrink_only_sizes(sizing: ConditionSizing, width: float, height: float) -> tuple[Size, Size]:
    """The ``shrink_only`` rule on a ``width x height`` image: the ``(w, h)`` the pipeline resizes it to (its
    own size unless above ``area``: ``Flux2ImageProcessor._resize_to_target_area``, sides truncated) and the
    ``(w, h)`` of its centre crop to multiples of ``multiple`` (at least ``multiple``)."""
    w, h = _pixels(width), _pixels(height)
    if w * h > sizing.area:
        scale = math.sqrt(sizing.area / (w * h))
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
    m = sizing.multiple
    return (w, h), (max(m, w // m * m), max(m, h // m * m))


def condition_crop(sizing: ConditionSizing, width: float, height: float) -> Box:
    """The part of a ``width x height`` condition image the pipeline keeps, normalised: ``shrink_only``: the
    crop of the (shrunk) image to its floored sides, offsets floored as ``Flux2ImageProcessor._resize_and_crop``
    does (``(w - fw) // 2``), a side already under ``multiple`` kept whole (stretched to ``multiple``); the
    other rules resize the whole image: ``FULL``."""
    if not sizing.shrink_only:
        return FULL
    (w, h), (fw, fh) = shrink_only_sizes(sizing, width, height)
    left, top = max(0, (w - fw) // 2), max(0, (h - fh) // 2)
    return left / w, top / h, min(1.0, (left + fw) / w), min(1.0, (top + fh) / h)


def sub_box(outer: Box, inner: Box) -> Box:
    """``inner`` (normalised to ``outer``) in the coordinates ``outer`` is normalised to."""
    x0, y0, x1, y1 = outer
    w, h = x1 - x0, y1 - y0
    return x0 + inner[0] * w, y0 + inner[1] * h, x0 + inner[2] * w, y0 + inner[3] * h


def condition_size(sizing: ConditionSizing, width: float, height: float) -> Size:
    """The ``(w, h)`` the pipeline described by ``sizing`` gives a condition image of ``width x height``
    pixels (see ``ConditionSizing``; ``shrink_only``: the size after its crop, ``condition_crop``)."""
    if sizing.shrink_only:
        return shrink_only_sizes(sizing, width, height)[1]
    m = sizing.input_multiple
    if m > 1:  # the pipeline floors the input's sides before it takes the aspect (a box's float sides:
        # 63.99999 is a 64 px side, not 63)
        width, height = (max(m, math.floor(round(x, 6)) // m * m) for x in (width, height))
    ratio = width / height
    if sizing.preferred:
        _, w, h = min((abs(ratio - w / h), w, h) for w, h in sizing.preferred)
        return w, h
    return calculate_dimensions(sizing.area, ratio, sizing.multiple)


def plan_control(
    width: int, height: int, data: DataConfig, target: Placement | None = None, sizing: ConditionSizing | None = None
) -> Placement:
    """Box and size of a ``width x height`` control. ``target``: the target's placement (None: a sample without
    target). ``sizing``: the trainer's pipeline rule (see the module docstring).

    With a ``shrink_only`` rule the box is narrowed to the pipeline's crop (``condition_crop`` of the box's
    pixel extent), so the one LANCZOS step of ``load.place`` maps output pixels onto the source exactly as the
    pipeline's shrink-then-crop does (scale ``W / int(W * s)`` per axis, the crop's floored offset). A control
    given whole is then the pipeline's image: exactly when it is not shrunk (a crop at scale 1); when shrunk,
    PIL's LANCZOS with a ``box`` in one step and the pipeline's resize-then-crop differ in float rounding of
    the filter taps, a few values (well under 1 %) by 1-2 levels of 255, no shift. A box of fractional pixel
    extent (a control sharing the target's crop) is read as its floored whole pixels, as the image the
    pipeline would get."""
    aligned = target is not None and shares_target_geometry(target.source, (width, height))
    if target is not None and aligned:
        box = target.box
    else:  # own aspect, clamped to max_aspect (the middle is kept)
        aspect = min(max(width / height, 1 / data.max_aspect), data.max_aspect)
        box = crop_box(width, height, aspect)
    own = Placement((width, height), box, (0, 0), aligned)
    mode = data.control_resolution
    if isinstance(mode, int):  # a budget, with sides on the multiple the trainer's pipeline needs (Qwen-Image 2.1: 32)
        size = budget_size(*own.extent, mode * mode, multiple=sizing.multiple if sizing is not None else MULTIPLE)
    elif mode is None and sizing is not None:
        size = condition_size(sizing, *own.extent)
        box = sub_box(box, condition_crop(sizing, *own.extent))
    elif target is not None and aligned:
        size = target.size
    else:
        size = plan_control_size(width, height, data, target.size if target is not None else None)
    return Placement((width, height), box, size, aligned)


def plan_vl(control: Placement, data: DataConfig, sizing: ConditionSizing | None = None) -> Size | None:
    """The size of a vision-language encoder's copy of a control (cut from the control's box), or None when
    the VL encoder sees the control itself: ``data.vl_resolution`` (budget side), else the rule's
    ``vl_area`` (``calculate_dimensions``), else None."""
    w, h = control.extent
    if data.vl_resolution is not None:
        size = budget_size(w, h, data.vl_resolution**2)
    elif sizing is not None and sizing.vl_area is not None:
        size = calculate_dimensions(sizing.vl_area, w / h)
    else:
        return None
    return size
