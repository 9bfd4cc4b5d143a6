"""Fixtures of the adapter tests: one torch thread, and one embedding cache per test module (its runs share it,
so every run after the first trains from the cache)."""

from __future__ import annotations

import pytest

from qflux.testing import single_torch_thread


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-cache")
