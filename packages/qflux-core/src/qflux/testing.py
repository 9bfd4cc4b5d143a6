"""Helpers for tests of qflux and its plugins: small configs on ``builtin:tiny`` + ``builtin:shapes``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def tiny_config(tmp: Path, trainer: str = "kontext", **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a few CPU steps at 32 px (2x2 tokens per image) writing under ``tmp``;
    ``sections`` update the sections of the same name (e.g. ``train={"max_steps": 2}``)."""
    config: dict[str, Any] = {
        "trainer": trainer,
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 4, "alpha": 4}},
        # controls at the target's size: the pipelines' ~1 MP condition sizes would make every tiny test slow
        "data": {"path": "builtin:shapes", "resolution": 32, "num_samples": 8, "holdout": 2,
                 "control_resolution": "target"},
        "cache": {"enabled": True, "dir": str(tmp / "cache")},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "save_every": 3, "seed": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }
    for section, values in sections.items():
        if isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the previous count.

    Tiny models gain nothing from intra-op threads, and on a shared 2-core machine oversubscribed threads
    make a tiny step many times slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
