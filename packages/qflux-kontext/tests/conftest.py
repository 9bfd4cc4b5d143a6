from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config.schema import ModelConfig
from qflux.plugins import build_registry
from qflux.testing import single_torch_thread
from qflux.types import EditSample


def rgb(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def mask(width: int, height: int) -> Image.Image:
    m = np.zeros((height, width), dtype=np.uint8)
    m[4:20, 8:30] = 255
    return Image.fromarray(m, "L")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box they lose a lot."""
    with single_torch_thread():
        yield


@pytest.fixture(name="rgb")
def rgb_fixture():
    return rgb


@pytest.fixture(scope="session")
def model() -> ModelConfig:
    return ModelConfig(pretrained="builtin:tiny", dtype="float32")


@pytest.fixture(scope="session")
def registry():
    return build_registry(load_entry_points=False, extra_plugins=[("kontext", _plugin())])


def _plugin():
    from qflux_kontext import plugin

    return plugin


@pytest.fixture(scope="session")
def trainer(registry):
    return registry.trainer("kontext")


@pytest.fixture(scope="session")
def pipe():
    from qflux_kontext.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def transformer(registry, trainer, model):
    return trainer.load_transformer(model)


@pytest.fixture(scope="session")
def encoders(registry, trainer, model):
    return trainer.load_encoders(model)


@pytest.fixture(scope="session")
def samples() -> list[EditSample]:
    return [
        EditSample("a", "make the red circle blue", rgb(48, 32, 1), [rgb(32, 32, 2)], mask=mask(48, 32)),
        EditSample("b", "Move the square to the LEFT!", rgb(48, 32, 3), [rgb(64, 48, 4), rgb(32, 16, 5)]),
        EditSample("c", "make the red circle blue", rgb(32, 32, 6), []),
    ]


@pytest.fixture(scope="session")
def encoded(registry, trainer, encoders, samples, model):
    return trainer.encode(encoders, samples, model, True)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
