"""Shared fixtures: tiny FLUX.2 pipelines (built once per session), deterministic images."""

from __future__ import annotations

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
    return tiny_model


@pytest.fixture(scope="session")
def pipelines():
    """The diffusers pipeline of each trainer, built from the same tiny parts as ``builtin:tiny``."""
    from qflux_flux2.tiny import build_tiny_pipeline

    return {name: build_tiny_pipeline(name) for name in ("flux2-dev", "flux2-klein")}


@pytest.fixture(scope="session")
def encoders():
    """float32 builtin:tiny encoders of each trainer."""
    from qflux_flux2.loading import load_encoders
    from qflux_flux2.variants import VARIANTS

    return {name: load_encoders(v, tiny_model()) for name, v in VARIANTS.items()}


@pytest.fixture(scope="session")
def transformers_():
    from qflux_flux2.loading import load_transformer
    from qflux_flux2.variants import VARIANTS

    return {name: load_transformer(v, tiny_model()) for name, v in VARIANTS.items()}
