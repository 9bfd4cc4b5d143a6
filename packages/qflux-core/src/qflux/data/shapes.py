"""``builtin:shapes``: a deterministic synthetic edit dataset generated in memory.

Each sample is 2-3 flat shapes (circle, square, triangle) of distinct colours on a plain background (the
control) and one edit of one shape (the target):

- recolour: ``"make the red circle blue"`` (the new colour is one no shape in the image has), or
- move: ``"move the green square to the left"`` (right / up / down), always by a quarter of the shorter side.

The mask is exactly the pixels that differ between control and target (shapes are drawn without
anti-aliasing, shapes never overlap and a moved shape never overlaps its old place). Sample ``i`` depends only
on ``i`` and its size (a local ``random.Random`` seeded with ``"qflux/shapes/i"``), not on ``num_samples`` or
any global seed. Sizes come from ``data.resolution``: ``r`` -> ``r x r``, ``[h, w]`` -> ``w x h``, a bucket
list -> the buckets in turn.

``builtin:shapes-pink``: the same kind of scenes from another seed (``"qflux/shapes-pink/i"``), every edit turning
one shape pink (``"make the red circle pink"``), a colour (``NEW_COLOURS``) that ``builtin:shapes`` never uses:
a model pretrained on ``builtin:shapes`` (``builtin:shapes-base``) has never seen it. The demo's LoRA learns it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from qflux.config.schema import DataConfig
from qflux.data.records import MemoryImage, SampleRecord

BACKGROUND = (236, 236, 230)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
# Edit colours builtin:shapes never uses (its scenes are drawn from COLOURS only): the new edits of the
# builtin:shapes-<colour> datasets.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (250, 110, 190)}
KINDS = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: int
    cy: int
    r: int  # half side: the shape fills the box [cx - r, cx + r] x [cy - r, cy + r]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        fill = COLOURS[self.colour] if self.colour in COLOURS else NEW_COLOURS[self.colour]
        x0, y0, x1, y1 = self.box
        if self.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif self.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(self.cx, y0), (x1, y1), (x0, y1)], fill=fill)


@dataclass(frozen=True)
class ShapeEdit:
    """One edit: recolour ``shape`` to ``colour``, or move it one step ``direction``."""

    shape: Shape
    colour: str | None = None
    direction: str | None = None

    @property
    def prompt(self) -> str:
        name = f"the {self.shape.colour} {self.shape.kind}"
        if self.colour is not None:
            return f"make {name} {self.colour}"
        where = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[self.direction or "left"]
        return f"move {name} {where}"


@dataclass
class ShapesExample:
    key: str
    prompt: str
    control: Image.Image
    target: Image.Image
    mask: Image.Image  # "L", 255 where control and target differ
    edit: ShapeEdit


def _gap(a: Shape, b: Shape, margin: int) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + margin < bx0 or bx1 + margin < ax0 or ay1 + margin < by0 or by1 + margin < ay0


def _inside(s: Shape, width: int, height: int, margin: int) -> bool:
    x0, y0, x1, y1 = s.box
    return x0 >= margin and y0 >= margin and x1 < width - margin and y1 < height - margin


def _render(shapes: list[Shape], width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        s.draw(draw)
    return image


def _radii(width: int, height: int) -> tuple[int, int]:
    side = min(width, height)
    return max(2, side // 14), max(2, side // 9)


def move_step(width: int, height: int) -> int:
    """Pixels a "move" edit shifts a shape: a quarter of the shorter side (more than a shape's size)."""
    return max(min(width, height) // 4, 2 * _radii(width, height)[1] + 2)


def _layout(rng: random.Random, width: int, height: int,
            new_colour: str | None = None) -> tuple[list[Shape], ShapeEdit]:
    """The scene and its edit; ``new_colour``: the edit always recolours the chosen shape to it."""
    r_lo, r_hi = _radii(width, height)
    step = move_step(width, height)
    margin = 1
    for _ in range(1000):
        count = rng.randint(2, 3)
        colours = rng.sample(sorted(COLOURS), count)
        shapes: list[Shape] = []
        for colour in colours:
            for _ in range(100):
                r = rng.randint(r_lo, r_hi)
                s = Shape(rng.choice(KINDS), colour, rng.randint(r, width - 1 - r), rng.randint(r, height - 1 - r), r)
                if _inside(s, width, height, margin) and all(_gap(s, o, margin) for o in shapes):
                    shapes.append(s)
                    break
        if len(shapes) != count:
            continue
        chosen = rng.randrange(count)
        shape = shapes[chosen]
        others = [o for i, o in enumerate(shapes) if i != chosen]
        if new_colour is not None:
            return shapes, ShapeEdit(shape, colour=new_colour)
        if rng.random() < 0.5:
            free = [c for c in sorted(COLOURS) if c not in colours]
            return shapes, ShapeEdit(shape, colour=rng.choice(free))
        directions = list(DIRECTIONS)
        rng.shuffle(directions)
        for direction in directions:
            dx, dy = DIRECTIONS[direction]
            moved = replace(shape, cx=shape.cx + dx * step, cy=shape.cy + dy * step)
            if _inside(moved, width, height, margin) and all(_gap(moved, o, margin) for o in others):
                return shapes, ShapeEdit(shape, direction=direction)
    raise RuntimeError(f"builtin:shapes: cannot lay out shapes at {width}x{height}")  # pragma: no cover


def _apply(shapes: list[Shape], edit: ShapeEdit, width: int, height: int) -> list[Shape]:
    step = move_step(width, height)
    out = []
    for s in shapes:
        if s == edit.shape:
            if edit.colour is not None:
                s = replace(s, colour=edit.colour)
            else:
                dx, dy = DIRECTIONS[edit.direction or "left"]
                s = replace(s, cx=s.cx + dx * step, cy=s.cy + dy * step)
        out.append(s)
    return out


def make_example(index: int, width: int, height: int, new_colour: str | None = None) -> ShapesExample:
    """Sample ``index`` at ``width x height`` (deterministic); ``new_colour`` (a ``NEW_COLOURS`` name): sample
    ``index`` of ``builtin:shapes-<new_colour>`` instead."""
    if new_colour is not None and new_colour not in NEW_COLOURS:
        raise ValueError(f"unknown new colour {new_colour!r} (known: {', '.join(NEW_COLOURS)})")
    rng = random.Random(f"qflux/shapes-{new_colour}/{index}" if new_colour else f"qflux/shapes/{index}")
    shapes, edit = _layout(rng, width, height, new_colour)
    control = _render(shapes, width, height)
    target = _render(_apply(shapes, edit, width, height), width, height)
    changed = np.any(np.asarray(control) != np.asarray(target), axis=-1)
    mask = Image.fromarray((changed * 255).astype(np.uint8))
    return ShapesExample(f"shapes_{index:04d}", edit.prompt, control, target, mask, edit)


def sample_size(index: int, data: DataConfig) -> tuple[int, int]:
    """``(w, h)`` of sample ``index`` for ``data.resolution``."""
    return data.resolution_spec.size_at(index)


def dataset_names() -> tuple[str, ...]:
    """The ``builtin:`` datasets of this module: ``shapes`` and ``shapes-<colour>`` per ``NEW_COLOURS``."""
    return ("shapes", *(f"shapes-{c}" for c in NEW_COLOURS))


def shapes_records(data: DataConfig, name: str = "shapes") -> list[SampleRecord]:
    """``data.num_samples`` records of ``builtin:<name>`` (``dataset_names()``)."""
    new_colour = name.removeprefix("shapes-") if name != "shapes" else None
    records = []
    for i in range(data.num_samples):
        ex = make_example(i, *sample_size(i, data), new_colour)
        origin = f"builtin:{name} #{i}"
        records.append(
            SampleRecord(
                key=ex.key,
                prompt=ex.prompt,
                target=MemoryImage(ex.target, f"{origin} target"),
                controls=(MemoryImage(ex.control, f"{origin} control"),),
                mask=MemoryImage(ex.mask, f"{origin} mask"),
                origin=origin,
            )
        )
    return records
