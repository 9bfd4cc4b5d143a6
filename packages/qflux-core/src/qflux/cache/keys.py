"""Cache keys: a hash of everything that changes an entry's content.

key = sha256(input files' bytes + prompt (the record fingerprint), resize settings, encoder identity
(folder file stamps or hub id + revision, dtype), trainer, plugin version, encoding options, format).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qflux.config.schema import QfluxConfig

CACHE_FORMAT = 1


@dataclass(frozen=True)
class CacheContext:
    """The part of a key shared by every sample of a run (computed once)."""

    digest: str

    @classmethod
    def from_config(cls, config: QfluxConfig, plugin_version: str) -> CacheContext:
        d = config.data
        parts = {
            "format": CACHE_FORMAT,
            "trainer": config.trainer,
            "plugin_version": plugin_version,
            "encoder": encoder_identity(config.model.pretrained, config.model.revision),
            "dtype": config.model.dtype,
            "max_sequence_length": config.model.max_sequence_length,
            "resize": {"resolution": d.resolution, "resize": d.resize, "control_resolution": d.control_resolution},
            "empty_prompt": d.caption_dropout > 0,
        }
        return cls(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest())


def encoder_identity(pretrained: str, revision: str | None) -> str:
    """A folder: names, sizes and mtimes of every file outside ``transformer/`` (the encoders, VAE,
    tokenizers; re-hashing many GB of weights at every start would cost minutes). A hub id or builtin
    name: itself plus the revision."""
    path = Path(pretrained)
    if not path.is_dir():
        return f"{pretrained}@{revision or 'main'}"
    h = hashlib.sha256(str(path.resolve()).encode())
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if not (Path(root) == path and x == "transformer"))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def entry_key(context: CacheContext, record_fingerprint: str) -> str:
    return hashlib.sha256(f"{context.digest}:{record_fingerprint}".encode()).hexdigest()[:40]
