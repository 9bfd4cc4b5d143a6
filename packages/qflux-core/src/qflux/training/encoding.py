"""Turn data records into ``EncodedSample``s through the trainer's ``qflux_encode`` hook.

The encoders are loaded lazily (``LazyEncoders``) so a run that needs no encoding never loads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    chunk: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> list[EncodedSample]:
    """Decode, resize and encode ``records`` in chunks; returns one EncodedSample per record, in order."""
    from qflux.data import load_sample

    out: list[EncodedSample] = []
    with_empty = config.data.caption_dropout > 0
    for start in range(0, len(records), chunk):
        samples = [load_sample(r, config.data) for r in records[start : start + chunk]]
        encoded = hook.qflux_encode(trainer=trainer, encoders=encoders.get(), samples=samples, model=config.model,
                                    empty_prompt=with_empty)
        if encoded is None:
            raise RuntimeError(f"no plugin implements qflux_encode for trainer '{trainer.name}'")
        out.extend(encoded)
        if on_progress is not None:
            on_progress(len(samples))
    return out
