"""Fixtures of the data-pipeline tests: small real image files written into ``tmp_path``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

Colour = tuple[int, int, int]


def _write(path: Path, size: tuple[int, int] = (48, 32), colour: Colour = (200, 40, 40), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    # a second colour on the right half, so crops and rotations are visible
    image.paste((20, 60, 220), (size[0] // 2, 0, size[0], size[1]))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, size=(w, h), colour=(r, g, b), mode="RGB")`` writes a two-colour image file."""
    return _write


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_folder(samples, name="ds")``: a folder-layout dataset.

    ``samples`` maps a stem to a dict of optional parts: ``target`` (file name or size), ``prompt`` (str, or
    None for no .txt), ``controls`` (list of sizes: main control then _control_1 ...), ``mask`` (size).
    """

    def make(samples: dict[str, dict], name: str = "ds") -> Path:
        root = tmp_path / name
        (root / "training_images").mkdir(parents=True, exist_ok=True)
        for stem, parts in samples.items():
            target_name = parts.get("target_name", f"{stem}.png")
            _write(root / "training_images" / target_name, parts.get("size", (48, 32)))
            prompt = parts.get("prompt", f"edit {stem}")
            if prompt is not None:
                (root / "training_images" / f"{stem}.txt").write_text(prompt, encoding="utf-8")
            for i, size in enumerate(parts.get("controls", [])):
                suffix = "" if i == 0 else f"_control_{i}"
                _write(root / "control_images" / f"{stem}{suffix}.png", size, (30, 160, 60))
            if "mask" in parts:
                _write(root / "control_images" / f"{stem}_mask.png", parts["mask"], mode="L")
        return root

    return make
