"""Validation grids carry labels (column names, step, prompt, notes) in bands of their own: the image cells
stay exactly the scaled images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qflux.training.validation import GAP, LABEL_HEIGHT, ValidationCase, grid
from qflux.types import SampleRequest


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def case(controls: list[Image.Image], target: Image.Image | None, prompt: str) -> ValidationCase:
    return ValidationCase(SampleRequest(prompt=prompt, controls=controls, height=32, width=48), target)


def dark(region: Image.Image) -> int:
    return int((np.asarray(region.convert("L")) < 128).sum())


def test_labelled_grid_keeps_cells_and_adds_text_bands():
    cell = 64
    control, sample, target = noise(48, 32, 1), noise(48, 32, 2), noise(48, 32, 3)
    two = [noise(32, 32, 4), noise(64, 32, 5)]
    cases = [case([control], target, "make the red circle blue"),
             case(two, None, "a very long prompt " * 20)]
    images = [sample, noise(48, 32, 6)]
    out = grid(cases, images, cell=cell, step=120, notes=["shift 0.3 px", "shift 2.0 px"])

    row_height = cell + 2 * LABEL_HEIGHT
    assert out.height == 2 * row_height + GAP
    # the cells: every tile exactly its image scaled to the cell height, below the column-name band
    y = 0
    for tiles in ([control, sample, target], [*two, images[1]]):
        x = 0
        for tile in tiles:
            scaled = tile.convert("RGB").resize((round(tile.width * cell / tile.height), cell))
            got = out.crop((x, y + LABEL_HEIGHT, x + scaled.width, y + LABEL_HEIGHT + cell))
            assert np.array_equal(np.asarray(got), np.asarray(scaled)), (x, y)
            assert dark(out.crop((x, y, x + scaled.width, y + LABEL_HEIGHT))) > 0  # a column name above each
            x += scaled.width + GAP
        caption = out.crop((0, y + LABEL_HEIGHT + cell, x - GAP, y + row_height))
        assert dark(caption) > 0  # step / prompt / notes below
        y += row_height + GAP
    # the long prompt is cut to the row: nothing is drawn past its last tile
    second_row_width = sum(round(t.width * cell / t.height) for t in [*two, images[1]]) + 2 * GAP
    assert dark(out.crop((second_row_width, row_height + GAP, out.width, out.height))) == 0


def test_labels_say_what_each_column_is():
    """The three column names and the caption render differently: a grid with the target column shows one
    label more than one without it, and a different step gives a different caption band."""
    control, sample, target = noise(32, 32, 1), noise(32, 32, 2), noise(32, 32, 3)
    with_target = grid([case([control], target, "p")], [sample], cell=32, step=5)
    without = grid([case([control], None, "p")], [sample], cell=32, step=5)
    assert with_target.width == 3 * 32 + 2 * GAP and without.width == 2 * 32 + GAP
    band = (0, 0, 2 * 32 + GAP, LABEL_HEIGHT)
    assert np.array_equal(np.asarray(with_target.crop(band)), np.asarray(without.crop(band)))
    assert dark(with_target.crop((2 * 32 + 2 * GAP, 0, with_target.width, LABEL_HEIGHT))) > 0  # "target"
    other_step = grid([case([control], None, "p")], [sample], cell=32, step=6)
    caption = (0, 32 + LABEL_HEIGHT, without.width, 32 + 2 * LABEL_HEIGHT)
    assert not np.array_equal(np.asarray(without.crop(caption)), np.asarray(other_step.crop(caption)))
