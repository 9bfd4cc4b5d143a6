"""``builtin:shapes``: deterministic, masks exactly the changed pixels, prompts that say the edit."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from qflux.config.schema import DataConfig
from qflux.data import check_dataset, load_sample, open_records
from qflux.data.shapes import COLOURS, DIRECTIONS, make_example, move_step

PROMPT = re.compile(
    r"^(make the (?P<c1>\w+) (?P<k1>circle|square|triangle) (?P<new>\w+)"
    r"|move the (?P<c2>\w+) (?P<k2>circle|square|triangle) (?P<dir>to the left|to the right|up|down))$"
)


def test_deterministic_and_independent_of_num_samples_and_global_seed():
    state, np_state = random.getstate(), np.random.get_state()
    a = open_records(DataConfig(path="builtin:shapes", resolution=64, num_samples=6))
    random.seed(123)
    np.random.seed(123)
    b = open_records(DataConfig(path="builtin:shapes", resolution=64, num_samples=10))
    assert [r.fingerprint() for r in a] == [r.fingerprint() for r in b[:6]]
    assert [r.prompt for r in a] == [r.prompt for r in b[:6]]
    assert len({r.fingerprint() for r in b}) == 10  # all different
    random.setstate(state)
    np.random.set_state(np_state)
    open_records(DataConfig(path="builtin:shapes", resolution=32, num_samples=4))
    assert random.getstate() == state  # no global seeding or consumption
    assert all(
        (x == y).all() if hasattr(x, "all") else x == y for x, y in zip(np.random.get_state(), np_state, strict=True)
    )


def _colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == np.array(COLOURS[colour]), axis=-1)


def test_masks_cover_exactly_the_changed_pixels_and_prompts_say_the_edit():
    kinds = set()
    for i in range(24):
        ex = make_example(i, 64, 48)
        control, target = np.asarray(ex.control), np.asarray(ex.target)
        mask = np.asarray(ex.mask)
        changed = np.any(control != target, axis=-1)
        assert ex.mask.mode == "L" and set(np.unique(mask)) <= {0, 255}
        assert ((mask == 255) == changed).all() and changed.any()
        match = PROMPT.match(ex.prompt)
        assert match, ex.prompt
        if match["new"]:
            kinds.add("recolour")
            old, new = match["c1"], match["new"]
            assert old != new and not _colour_mask(control, new).any()  # the new colour was not in the image
            region = _colour_mask(control, old)
            assert (region == changed).all() and _colour_mask(target, new)[region].all()
        else:
            kinds.add("move")
            colour = match["c2"]
            before, after = _colour_mask(control, colour), _colour_mask(target, colour)
            dx, dy = DIRECTIONS[match["dir"].replace("to the ", "")]
            step = move_step(64, 48)
            ys, xs = np.nonzero(before)
            assert after[ys + dy * step, xs + dx * step].all() and after.sum() == before.sum()
            assert not (before & after).any()  # the moved shape leaves its old place entirely
            assert ((before | after) == changed).all()
    assert kinds == {"recolour", "move"}


def test_sizes_follow_the_resolution_and_load_like_any_dataset():
    fixed = open_records(DataConfig(path="builtin:shapes", resolution=[32, 48], num_samples=2))
    assert fixed[0].target.image.size == (48, 32)
    cfg = DataConfig(path="builtin:shapes", resolution=[[32, 64], [64, 32]], num_samples=4)
    records = open_records(cfg)
    assert [r.target.image.size for r in records] == [(64, 32), (32, 64), (64, 32), (32, 64)]
    sample = load_sample(records[1], cfg)
    assert sample.target.size == (32, 64) and sample.controls[0].size == (32, 64) and sample.mask.size == (32, 64)
    assert sample.prompt == records[1].prompt and sample.files == ()
    assert check_dataset(DataConfig(path="builtin:shapes", resolution=32, num_samples=3)) == []


def test_shapes_pink_turns_one_shape_a_colour_builtin_shapes_never_uses():
    from qflux.data.shapes import NEW_COLOURS

    pink = np.array(NEW_COLOURS["pink"])
    records = open_records(DataConfig(path="builtin:shapes-pink", resolution=64, num_samples=12))
    plain = open_records(DataConfig(path="builtin:shapes", resolution=64, num_samples=12))
    assert {r.fingerprint() for r in records}.isdisjoint(r.fingerprint() for r in plain)  # other scenes
    assert records[3].origin == "builtin:shapes-pink #3"
    for i, record in enumerate(records):
        ex = make_example(i, 64, 64, "pink")
        assert record.prompt == ex.prompt and PROMPT.match(ex.prompt)["new"] == "pink"
        control, target, changed = np.asarray(ex.control), np.asarray(ex.target), np.asarray(ex.mask) == 255
        old = PROMPT.match(ex.prompt)["c1"]
        assert (_colour_mask(control, old) == changed).all() and np.all(target[changed] == pink)
        assert not np.all(control == pink, axis=-1).any()
    for i in range(200):  # builtin:shapes never shows nor names it
        ex = make_example(i, 64, 64)
        assert "pink" not in ex.prompt
        assert not np.all(np.asarray(ex.target) == pink, axis=-1).any()
    with pytest.raises(ValueError, match="unknown new colour"):
        make_example(0, 64, 64, "teal")
