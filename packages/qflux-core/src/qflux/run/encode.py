"""The encoding phase of a training run: the dataset encoded (or read from the embedding cache) before the
transformer is loaded, so encoders and transformer never need to share memory; then the validation cases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qflux.run.context import Run
from qflux.training.encoding import LazyEncoders
from qflux.types import EncodedSample


@dataclass
class EncodedData:
    train_set: Sequence[EncodedSample]
    holdout_set: list[EncodedSample]
    encoders: LazyEncoders  # kept (on CPU) when validation samples images, released otherwise
    sampling_on: bool  # validation renders images
    validation_cases: list[Any] = field(default_factory=list)  # training.validation.ValidationCase


def encode_phase(run: Run, records: list | None = None) -> EncodedData:
    from qflux.data import load_sample, open_records, split_holdout
    from qflux.run.cache import open_cache
    from qflux.training.encoding import encode_records, fill_cache, prepare_samples

    config, trainer, console = run.config, run.trainer, run.console
    records = open_records(config.data) if records is None else records
    train_records, holdout_records = split_holdout(records, config.data.holdout)
    encoders = LazyEncoders(trainer, config, run.device)
    cache, context = open_cache(config, run.registry, console) if config.cache.enabled else (None, None)
    with console.status("encoding the dataset"):
        if cache is not None and run.world > 1:  # each rank fills its share of the cache, then all read it whole
            fill_cache((train_records + holdout_records)[run.rank::run.world], trainer, encoders, config, cache,
                       context)
            run.accelerator.wait_for_everyone()
            cache, context = open_cache(config, run.registry, console)  # re-read the index the others appended to
        train_set = prepare_samples(train_records, trainer, encoders, config, cache, context)
        holdout_set = encode_records(holdout_records, trainer, encoders, config, cache, context)

    # Before the transformer is loaded: validation sampling keeps the encoders, on CPU (Trainer.sample moves
    # them to the device while it runs); otherwise they are dropped.
    sampling_on = config.validation.every > 0 and bool(config.validation.samples or
                                                       (config.validation.from_holdout and holdout_records))
    data = EncodedData(train_set, holdout_set, encoders, sampling_on)
    if sampling_on:
        from qflux.training.validation import cases_from_config

        sizing = trainer.info.condition_sizing
        holdout_samples = [load_sample(r, config.data, sizing) for r in holdout_records]
        data.validation_cases = cases_from_config(config, holdout_samples, sizing)
        encoders.offload()
    else:
        encoders.release()
    return data
