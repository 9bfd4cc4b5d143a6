"""Fixtures for end-to-end training tests."""

from __future__ import annotations

import pytest

from qflux.config import load_config
from qflux.testing import tiny_config, write_config


@pytest.fixture
def make_config(tmp_path):
    """``make_config(trainer="kontext", train={...}, ...)`` -> a validated tiny QfluxConfig under tmp_path."""

    def make(trainer: str = "kontext", **sections):
        return load_config(write_config(tmp_path / f"{trainer}.yaml", tiny_config(tmp_path, trainer, **sections)))

    return make
