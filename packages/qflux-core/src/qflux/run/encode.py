"""The encoding phase of a training run: the dataset encoded (or read from the embedding cache) before the
transformer is loaded, so encoders and transformer never need to share memory; then the validation cases,
encoded too (``Trainer.encode_request``) when the trainer can: sampling then needs only the transformer and
``Trainer.decoder``'s part of the encoders (the VAE), and the text encoders are freed here."""

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
    encoders: LazyEncoders  # kept (on CPU) for a trainer that samples from raw requests, released otherwise
    sampling_on: bool  # validation renders images
    validation_cases: list[Any] = field(default_factory=list)  # training.validation.ValidationCase
    decoder: Any = None  # Trainer.decoder's (on CPU) when the cases are pre-encoded: what sampling gets as encoders

    def sampling_encoders(self) -> Any:
        """What ``Trainer.sample`` gets as ``bundle.encoders``: the decoder of pre-encoded cases, else the whole
        encoders (loaded on first use: a trainer without ``encode_request``)."""
        return self.decoder if self.decoder is not None else self.encoders.get()


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

    # Before the transformer is loaded: the validation requests are encoded (Trainer.encode_request), the VAE
    # decoder kept on CPU and the rest of the encoders dropped. A trainer that samples from raw requests keeps
    # the encoders on CPU (Trainer.sample moves them to the device while it runs). No sampling: dropped.
    sampling_on = config.validation.every > 0 and bool(config.validation.samples or
                                                       (config.validation.from_holdout and holdout_records))
    data = EncodedData(train_set, holdout_set, encoders, sampling_on)
    if sampling_on:
        from qflux.training.validation import cases_from_config

        sizing = trainer.info.condition_sizing
        holdout_samples = [load_sample(r, config.data, sizing) for r in holdout_records]
        data.validation_cases = cases_from_config(config, holdout_samples, sizing)
        if trainer.implements("encode_request"):
            encode_validation(run, data)
        else:
            encoders.offload()
    else:
        encoders.release()
    return data


def encode_validation(run: Run, data: EncodedData) -> None:
    """Each validation case's prompts and controls encoded once, now, with the encoders on the training device;
    the decoder (``Trainer.decoder``: the VAE, ``validation.vae_tiling``) kept on CPU, the encoders released."""
    from qflux.training.validation import encode_cases

    config, trainer = run.config, run.trainer
    with run.console.status("encoding the validation prompts and controls"):
        loaded = data.encoders.get()
        encode_cases(trainer, loaded, data.validation_cases, config.model)
        decoder = trainer.decoder(loaded, config.validation.vae_tiling)
    del loaded
    data.encoders.release()
    data.decoder = decoder.to("cpu") if hasattr(decoder, "to") else decoder
