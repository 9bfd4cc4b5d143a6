"""The config fingerprint a checkpoint records: what a resumed run must share with the run that wrote it.

One definition, used by the run (``qflux.run.train``), preflight and ``resume`` (which names the keys that
differ): model, data, trainer, and the train keys that fix the data order and the noise of each step.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qflux.config.schema import QfluxConfig

TRAIN_KEYS = {"batch_size", "grad_accum", "seed", "optimizer", "timestep_sampling"}


def fingerprint_parts(config: QfluxConfig) -> dict[str, Any]:
    return {
        "trainer": config.trainer,
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", include=TRAIN_KEYS),
    }


def config_fingerprint(config: QfluxConfig) -> str:
    """Hash of ``fingerprint_parts``."""
    return hashlib.sha256(json.dumps(fingerprint_parts(config), sort_keys=True).encode()).hexdigest()[:16]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differing_keys(old: QfluxConfig, new: QfluxConfig) -> list[str]:
    """``key: old -> new`` for every fingerprinted key where the two configs differ."""
    before, after = _flat(fingerprint_parts(old)), _flat(fingerprint_parts(new))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]
