"""Fixtures of the real-shape tests: diffusers folders of the real configs at reduced depth (built once per
session, in bfloat16 like the real checkpoints), a 256 x 256 edit pair, and a spy on a class's forward."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import numpy as np
import pytest
import real_configs
from PIL import Image


@pytest.fixture(scope="session")
def kontext_folder(tmp_path_factory) -> Path:
    return real_configs.build_kontext_folder(tmp_path_factory.mktemp("real") / "kontext")


@pytest.fixture(scope="session")
def qwen_shared(tmp_path_factory) -> Path:
    return real_configs.build_qwen_shared(tmp_path_factory.mktemp("real") / "qwen-shared")


@pytest.fixture(scope="session")
def edit_pair(tmp_path_factory) -> Path:
    """A qflux folder dataset of one 256 x 256 sample: a smooth picture with a square (the control) and the
    same picture with the square moved and recoloured (the target)."""
    root = tmp_path_factory.mktemp("pair")
    (root / "training_images").mkdir()
    (root / "control_images").mkdir()
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    base = np.stack([x, y, (x + y) / 2], axis=-1)
    control, target = base.copy(), base.copy()
    control[64:128, 64:128] = (230, 30, 30)
    target[96:160, 112:176] = (30, 30, 230)
    Image.fromarray(control.astype(np.uint8)).save(root / "control_images" / "pair.png")
    Image.fromarray(target.astype(np.uint8)).save(root / "training_images" / "pair.png")
    (root / "training_images" / "pair.txt").write_text("move the red square to the right and make it blue")
    return root


class Spy:
    """Records the keyword arguments (and the first positional ones) of every call of ``cls.forward``."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def wrap(self, forward):
        spy = self

        def recording(module, *args, **kwargs):
            spy.calls.append({"module": module, "args": args, **kwargs})
            return forward(module, *args, **kwargs)

        return recording


@pytest.fixture
def spy_on(monkeypatch):
    """``spy_on(cls)`` -> a ``Spy`` of ``cls.forward`` for this test."""
    spies: list[Spy] = []

    def spy_on(cls) -> Spy:
        spy = Spy()
        spies.append(spy)
        monkeypatch.setattr(cls, "forward", spy.wrap(cls.forward))
        return spy

    yield spy_on
    for spy in spies:  # the calls hold the models (GBs): drop them before the next test loads its own
        spy.calls.clear()


@pytest.fixture(autouse=True)
def release_memory():
    """After each test, give the freed model memory back to the OS: the machine's RAM is shared, and glibc
    keeps freed heap memory mapped unless asked."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
