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


def wrap_trainer(registry: Any, name: str, **around: Any) -> Any:
    """Replace the registered trainer ``name`` by a copy whose stages in ``around`` run
    ``around[stage](original_method, *args)``: a spy or a fault injector for one test, the other stages and
    the trainer's class (capabilities, its tiny builder) unchanged. Returns the copy."""
    import copy
    import functools

    inner = registry.trainers[name]
    wrapped = copy.copy(inner)
    for stage, fn in around.items():
        setattr(wrapped, stage, functools.partial(fn, getattr(inner, stage)))
    registry.trainers[name] = wrapped
    return wrapped


STAGES = ("load_transformer", "load_encoders", "encode", "scheduler_config", "predict", "encode_request", "decoder",
          "sample")


def spied_registry(*spies: Any, trainer: str | None = None, **build: Any) -> Any:
    """``build_registry(**build)`` with every trainer (or only ``trainer``) wrapped by the spies: a spy's method
    named like a stage (``encode(self, inner, encoders, samples, model, empty_prompt)``) runs instead of it and
    calls ``inner`` (the trainer's own method) when it wants the real result. Spies of one stage nest in order."""
    from qflux.plugins import build_registry

    registry = build_registry(**build)
    for name in [trainer] if trainer else list(registry.trainers):
        for spy in spies:
            around = {stage: getattr(spy, stage) for stage in STAGES if callable(getattr(spy, stage, None))}
            if around:
                wrap_trainer(registry, name, **around)
    return registry


def probed_step(config: Any, trainer: str) -> Any:
    """Train ``config`` (one step is enough) with a ``SavedBytesProbe`` on the first forward of ``trainer``'s
    transformer; returns the probe (the activation calibration of ``qflux.plan``: tests/plan and
    benchmarks/calibrate_activations.py)."""
    from qflux.plan.probe import SavedBytesProbe
    from qflux.run.train import train
    from qflux.training.sharding import blocks_of

    seen: dict[str, Any] = {}

    class Probe:
        def predict(self, inner, transformer, batch, noisy, model_config):
            if "probe" in seen:
                return inner(transformer, batch, noisy, model_config)
            seen["probe"] = SavedBytesProbe(blocks_of(transformer))
            with seen["probe"].watch(transformer):
                return inner(transformer, batch, noisy, model_config)

    with single_torch_thread():
        train(config, registry=spied_registry(Probe(), trainer=trainer))
    return seen["probe"]
