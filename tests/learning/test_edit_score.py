"""``val_edit_score``: how much of the edited region took the target's colour, from pixels only; the console
note that prints it beside the base's; the grid's base column."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qflux.data.shapes import NEW_COLOURS, make_example
from qflux.fidelity import EDIT_TOLERANCE, edit_score
from qflux.training.val_fidelity import KEYS, measure_case, score_note, summarize
from qflux.training.validation import ValidationCase, grid
from qflux.types import SampleRequest


def test_the_score_is_the_share_of_the_edited_region_in_the_target_colour():
    ex = make_example(5, 64, 64, "pink")
    edited = np.asarray(ex.mask) == 255
    assert edit_score(ex.target, ex.target, edited) == 1.0
    assert edit_score(ex.target, ex.control, edited) == 0.0  # the edit did not happen
    half = np.asarray(ex.control).copy()
    ys, xs = np.nonzero(edited)
    top = ys < np.median(ys)
    half[ys[top], xs[top]] = NEW_COLOURS["pink"]
    assert edit_score(ex.target, Image.fromarray(half), edited) == pytest.approx(top.mean())
    near = np.clip(np.asarray(ex.target).astype(int) + round(255 * EDIT_TOLERANCE) - 1, 0, 255).astype(np.uint8)
    far = np.clip(np.asarray(ex.target).astype(int) - round(255 * EDIT_TOLERANCE) - 2, 0, 255).astype(np.uint8)
    assert edit_score(ex.target, Image.fromarray(near), edited) == 1.0
    assert edit_score(ex.target, Image.fromarray(far), edited) == 0.0
    assert edit_score(ex.target, ex.target, np.zeros_like(edited)) is None


def test_measured_per_case_and_summarised():
    ex = make_example(6, 64, 64, "pink")
    done = measure_case([ex.control], ex.target, ex.mask, ex.target)
    missed = measure_case([ex.control], ex.target, ex.mask, ex.control)
    assert (done.edit_score, missed.edit_score) == (1.0, 0.0)
    assert done.unedited_psnr == missed.unedited_psnr == 100.0  # both keep the rest exactly
    assert "val_edit_score" in KEYS and summarize([done, missed])["val_edit_score"] == 0.5
    assert "edit_score" in done.as_row()


def test_the_console_note_gives_the_base_beside():
    means = {"val_edit_score": 0.8123, "val_unedited_psnr": 30.04}
    base = {"val_edit_score": 0.01, "val_unedited_psnr": 29.5}
    assert score_note(means) == " (edit score 0.81; unedited 30.0 dB)"
    assert score_note(means, base) == " (edit score 0.81, base 0.01; unedited 30.0 dB, base 29.5 dB)"
    assert score_note({"val_zoom": 1.0}, base) == ""


def test_the_grid_shows_the_base_column_when_given():
    ex = make_example(7, 64, 64, "pink")
    case = ValidationCase(SampleRequest(prompt=ex.prompt, controls=[ex.control], height=64, width=64), ex.target)
    plain = grid([case], [ex.target], cell=64, step=0)
    with_base = grid([case], [ex.target], cell=64, step=10, base=[ex.control])
    assert with_base.width - plain.width == 64 + 4  # one more tile and gap
    assert with_base.height == plain.height
