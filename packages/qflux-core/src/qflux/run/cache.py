"""Fill the embedding cache for a config's dataset (``qflux cache``, ``qflux train --cache``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from qflux.cache.keys import CacheContext
from qflux.cache.store import EmbeddingCache
from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError
from qflux.plugins import Registry


@dataclass
class CacheBuildReport:
    samples: int
    encoded: int  # entries written by this call (the rest were already cached)
    seconds: float
    encoders_loaded: bool


def open_cache(config: QfluxConfig, registry: Registry, console: Console) -> tuple[EmbeddingCache, CacheContext]:
    trainer = registry.trainer(config.trainer)
    context = CacheContext.from_config(config, registry.version_of_trainer(trainer.name))
    root = Path(config.cache.dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"cache.dir: {root} is a file, not a folder")
    # The folder itself is created by the first entry written, so a run that fails before encoding leaves
    # no empty cache folder behind.
    return EmbeddingCache(root, warn=console.print, owner=trainer.name), context


def build_cache(config: QfluxConfig, registry: Registry, console: Console | None = None,
                records: list | None = None) -> CacheBuildReport:
    """Encode every sample of ``config.data`` that is not cached yet (held-out samples included); ``records``:
    the dataset's records when the caller has them (preflight's), else it is opened here."""
    from qflux.data import open_records
    from qflux.training.encoding import LazyEncoders, encode_records, training_device

    console = console or Console(stderr=True, soft_wrap=True, highlight=False)
    trainer = registry.trainer(config.trainer)
    cache, context = open_cache(config, registry, console)
    records = open_records(config.data) if records is None else records
    before = sum(1 for r in records if cache.get(_key(context, r)) is not None)
    # on the device training would use (the GPU when there is one), as the training loop encodes
    encoders = LazyEncoders(trainer, config, training_device())
    started = time.perf_counter()
    with console.status(f"caching {len(records)} samples in {cache.root}"):
        encode_records(records, trainer, encoders, config, cache=cache, context=context)
    loaded = encoders.loaded
    encoders.release()  # `train --cache` loads the transformer next: keep nothing of the encoders on the device
    return CacheBuildReport(len(records), len(records) - before, time.perf_counter() - started, loaded)


def _key(context: CacheContext, record: object) -> str:
    from qflux.cache.keys import entry_key

    return entry_key(context, record.fingerprint())
