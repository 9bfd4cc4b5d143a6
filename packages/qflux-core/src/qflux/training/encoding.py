"""Turn data records into ``EncodedSample``s through the trainer's ``qflux_encode`` hook.

The encoders are loaded lazily (``LazyEncoders``) so a run that needs no encoding never loads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qflux.cache import CacheContext, EmbeddingCache, entry_key
from qflux.config.schema import QfluxConfig
from qflux.types import EncodedSample, TrainerInfo


class LazyEncoders:
    """Loads the trainer's encoders through ``qflux_load_encoders`` on first access, once."""

    def __init__(self, hook: Any, trainer: TrainerInfo, config: QfluxConfig) -> None:
        self._hook, self._trainer, self._config = hook, trainer, config
        self._value: Any = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def release(self) -> None:
        """Drop the reference so the encoders' memory can be freed (loaded again if needed)."""
        self._value = None

    def get(self) -> Any:
        if self._value is None:
            self._value = self._hook.qflux_load_encoders(trainer=self._trainer, model=self._config.model)
            if self._value is None:
                raise RuntimeError(f"no plugin implements qflux_load_encoders for trainer '{self._trainer.name}'")
        return self._value


def encode_records(
    records: Sequence[Any],
    hook: Any,
    trainer: TrainerInfo,
    encoders: LazyEncoders,
    config: QfluxConfig,
    cache: EmbeddingCache | None = None,
    context: CacheContext | None = None,
    chunk: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> list[EncodedSample]:
    """One EncodedSample per record, in order: from the cache when a verified entry exists, otherwise
    decoded, resized and encoded in chunks (and stored). The encoders load only if something is missing."""
    from qflux.data import load_sample

    out: list[EncodedSample | None] = [None] * len(records)
    keys: list[str | None] = [None] * len(records)
    missing: list[int] = []
    for i, record in enumerate(records):
        if cache is not None and context is not None:
            keys[i] = entry_key(context, record.fingerprint())
            out[i] = cache.get(keys[i])
        if out[i] is None:
            missing.append(i)
        elif on_progress is not None:
            on_progress(1)
    with_empty = config.data.caption_dropout > 0
    for start in range(0, len(missing), chunk):
        part = missing[start : start + chunk]
        samples = [load_sample(records[i], config.data) for i in part]
        encoded = hook.qflux_encode(trainer=trainer, encoders=encoders.get(), samples=samples, model=config.model,
                                    empty_prompt=with_empty)
        if encoded is None:
            raise RuntimeError(f"no plugin implements qflux_encode for trainer '{trainer.name}'")
        for i, sample in zip(part, encoded):
            out[i] = sample
            if cache is not None and keys[i] is not None:
                cache.put(keys[i], sample)
        if on_progress is not None:
            on_progress(len(part))
    return out  # type: ignore[return-value]
