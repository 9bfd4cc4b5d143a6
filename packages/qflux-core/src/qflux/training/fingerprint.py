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

# Fingerprinted keys added after checkpoints of earlier versions exist (key -> its default): left out while they
# hold that default, so such a checkpoint still resumes (its run could only have meant the default), and a
# fingerprint changes only when the new option is used. tests/training/test_resume_changes.py pins the
# fingerprint of earlier versions' configs.
ADDED_LATER: dict[str, Any] = {
    "model.lora.dora": False,  # 0.5.0
    "model.lora.rslora": False,  # 0.5.0
}


# Keys of the fingerprinted sections that cannot change a step's numbers (where weights live, not what they are):
# free to change on --resume.
NOT_FINGERPRINTED = ("model.offload_blocks",)


def fingerprint_parts(config: QfluxConfig) -> dict[str, Any]:
    parts = {
        "trainer": config.trainer,
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", include=TRAIN_KEYS),
    }
    for key in (*ADDED_LATER, *NOT_FINGERPRINTED):
        *path, leaf = key.split(".")
        section = parts
        for name in path:
            section = section[name]
        if key in NOT_FINGERPRINTED or section.get(leaf) == ADDED_LATER[key]:
            section.pop(leaf, None)
    return parts


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
    before, after = {**ADDED_LATER, **before}, {**ADDED_LATER, **after}
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]
