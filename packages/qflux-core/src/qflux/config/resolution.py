"""``data.resolution`` read once: its form, the resize mode it implies, its sizes, nominal area and default size.

The YAML value keeps its three forms (``Resolution``): an int ``r`` (a square's pixel budget), ``[h, w]`` (one
fixed size) or ``[[h, w], ...]`` (aspect buckets). ``config.data.resolution`` stays that raw value (the cache key
and the written config.yaml use it); every reader asks ``DataConfig.resolution_spec`` (``ResolutionSpec.parse``)
instead of testing the value's type itself. Pure: no torch, no PIL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Resolution = int | tuple[int, int] | list[tuple[int, int]]  # the config value, as the schema validates it
ResizeMode = Literal["fixed", "budget", "buckets"]
Form = Literal["int", "hw", "list"]  # r | [h, w] | [[h, w], ...]
Size = tuple[int, int]  # (width, height), PIL order
HW = tuple[int, int]  # (height, width), the config's order

MULTIPLE = 16
IMPLIED_MODE: dict[Form, ResizeMode] = {"int": "budget", "hw": "fixed", "list": "buckets"}


def auto_buckets(side: int, max_aspect: float) -> list[HW]:
    """Buckets ``[h, w]`` of about ``side * side`` pixels, aspect up to ``max_aspect``, sorted by aspect."""
    step = 64 if side >= 256 else MULTIPLE
    area = side * side
    out: set[HW] = set()
    w = step
    while w <= side * max_aspect:
        h = max(step, int(round(area / w / step)) * step)
        if max(w, h) / min(w, h) <= max_aspect:
            out.add((h, w))
        w += step
    out.add((side, side))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


@dataclass(frozen=True)
class ResolutionSpec:
    """One parsed ``data.resolution`` (with ``data.resize``).

    ``sizes``: the ``(h, w)`` the value names: ``r`` -> ``((r, r),)``, ``[h, w]`` -> ``((h, w),)``, a bucket
    list -> its buckets in order (possibly empty: the readers that need one say so).
    """

    form: Form
    sizes: tuple[HW, ...]
    mode: ResizeMode  # data.resize, or the one the form implies (int: budget, [h, w]: fixed, list: buckets)

    @classmethod
    def parse(cls, value: Resolution, resize: ResizeMode | None = None) -> ResolutionSpec:
        form: Form
        if isinstance(value, int):
            form, sizes = "int", ((value, value),)
        elif isinstance(value, tuple):
            form, sizes = "hw", ((int(value[0]), int(value[1])),)
        else:
            form, sizes = "list", tuple((int(h), int(w)) for h, w in value)
        return cls(form, sizes, resize if resize is not None else IMPLIED_MODE[form])

    @property
    def side(self) -> int | None:
        """The int of the ``r`` form (a square's side), else None."""
        return self.sizes[0][0] if self.form == "int" else None

    @property
    def single(self) -> Size | None:
        """The ``(w, h)`` when the value names exactly one size (``r``, ``[h, w]`` or a one-bucket list), else None."""
        if len(self.sizes) != 1:
            return None
        h, w = self.sizes[0]
        return w, h

    @property
    def nominal_area(self) -> int:
        """Pixel count the resolution stands for (a bucket list: its largest bucket; empty: ValueError)."""
        return max(h * w for h, w in self.sizes)

    @property
    def default_size(self) -> Size:
        """The ``(w, h)`` of an output with no image to plan from: the square budget, the fixed size, or the
        squarest bucket (of equally square ones the largest)."""
        if self.single is not None:
            return self.single
        h, w = min(self.sizes, key=lambda hw: (abs(math.log(hw[1] / hw[0])), -hw[0] * hw[1]))
        return w, h

    def buckets(self, max_aspect: float) -> list[HW]:
        """The ``(h, w)`` buckets of ``buckets`` mode: generated for ``r`` (``auto_buckets``), else ``sizes``."""
        side = self.side
        return auto_buckets(side, max_aspect) if side is not None else list(self.sizes)

    def size_at(self, index: int) -> Size:
        """``(w, h)`` of the ``index``-th sample when sizes are taken in turn (``builtin:shapes``)."""
        h, w = self.sizes[index % len(self.sizes)]
        return w, h
