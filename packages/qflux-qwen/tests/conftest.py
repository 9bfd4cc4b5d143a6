"""Shared fixtures: tiny models (built once per session), tiny diffusers folders, deterministic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qflux.config.schema import ModelConfig
from qflux.testing import single_torch_thread


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def tiny_model(**kwargs) -> ModelConfig:
    return ModelConfig(**{"pretrained": "builtin:tiny", "dtype": "float32", **kwargs})


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box they lose a lot."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def image():
    """``image(width, height, seed)``: a deterministic RGB noise image."""
    return noise_image


@pytest.fixture(scope="session")
def model_config():
    """``model_config(**overrides)``: a float32 ``builtin:tiny`` ModelConfig."""
    return tiny_model


@pytest.fixture(scope="session")
def variants():
    from qflux_qwen.variants import VARIANTS

    return VARIANTS


@pytest.fixture(scope="session")
def encoders():
    """float32 builtin:tiny encoders (the same for the three trainers)."""
    from qflux_qwen.loading import load_encoders
    from qflux_qwen.variants import VARIANTS

    return load_encoders(VARIANTS["qwen-edit"], tiny_model())


@pytest.fixture(scope="session")
def transformers_():
    """builtin:tiny transformer of each trainer (float32)."""
    from qflux_qwen.loading import load_transformer
    from qflux_qwen.variants import VARIANTS

    return {name: load_transformer(v, tiny_model()) for name, v in VARIANTS.items()}


@pytest.fixture(scope="session")
def plus_folder(tmp_path_factory) -> Path:
    from qflux_qwen.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen-edit-plus", "qwen-edit-plus")
