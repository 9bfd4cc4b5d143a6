"""Small end-to-end training configs on builtin:tiny + builtin:shapes (32 px: 2x2 tokens per image)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qflux.config import load_config


def tiny_config(tmp: Path, trainer: str = "kontext", **sections) -> dict:
    config = {
        "trainer": trainer,
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 4, "alpha": 4}},
        "data": {"path": "builtin:shapes", "resolution": 32, "num_samples": 8, "holdout": 2},
        "cache": {"enabled": True, "dir": str(tmp / "cache")},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "save_every": 3, "seed": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def make_config(tmp_path):
    def make(trainer: str = "kontext", **sections):
        return load_config(write_config(tmp_path / f"{trainer}.yaml", tiny_config(tmp_path, trainer, **sections)))

    return make
