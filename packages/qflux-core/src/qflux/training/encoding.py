"""Turn data records into ``EncodedSample``s through the selected ``Trainer.encode``.

The encoders are loaded lazily (``LazyEncoders``) so a run that needs no encoding never loads them, and
moved to the training device for encoding. With the cache on, training reads each sample from disk when
its batch comes (``CachedSamples``): RAM holds one batch, not the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import combinations
from typing import Any

import torch

from qflux.cache import CacheContext, EmbeddingCache, entry_key
from qflux.config.schema import ModelConfig, QfluxConfig
from qflux.model_source import torch_dtype
from qflux.trainer import Trainer
from qflux.types import EditSample, EncodedSample, PromptEmbeds


def training_device() -> torch.device:
    """The device this process trains on, chosen as the training loop's ``Accelerator`` chooses it (accelerate's
    process state: the local rank's accelerator under a multi-process launch, else the one accelerator, else
    the CPU). ``qflux cache`` and ``train --cache`` encode there too: on a GPU machine the VAE and text
    encoders are many times faster on the GPU than on the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available()).device


class LazyEncoders:
    """Loads the trainer's encoders (``Trainer.load_encoders``) on first access, once."""

    def __init__(self, trainer: Trainer, config: QfluxConfig, device: Any = None) -> None:
        self._trainer, self._config, self._device = trainer, config, device
        self._value: Any = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def offload(self) -> None:
        """Keep the encoders but move them to CPU (if loaded and movable), freeing the device for training."""
        if self._value is not None and self._device is not None and hasattr(self._value, "to"):
            self._value = self._value.to("cpu")

    def release(self) -> None:
        """Drop the reference so the encoders' memory can be freed (loaded again if needed)."""
        self._value = None

    def get(self) -> Any:
        if self._value is None:
            self._value = self._trainer.load_encoders(self._config.model)
            if self._device is not None and hasattr(self._value, "to"):  # encode on the GPU when there is one
                self._value = self._value.to(self._device)
        return self._value


def encode_records(
    records: Sequence[Any],
    trainer: Trainer,
    encoders: LazyEncoders,
    config: QfluxConfig,
    cache: EmbeddingCache | None = None,
    context: CacheContext | None = None,
    chunk: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> list[EncodedSample]:
    """One EncodedSample per record, in order: from the cache when a verified entry exists, otherwise
    decoded, resized and encoded in chunks (and stored). The encoders load only if something is missing.
    Reference dropout on a trainer whose prompt sees the controls adds the prompts of the control subsets
    (``encode_with_subset_prompts``)."""
    from qflux.data import load_sample

    out: list[EncodedSample | None] = [None] * len(records)
    keys: list[str | None] = [None] * len(records)
    missing: list[int] = []
    for i, record in enumerate(records):
        if cache is not None and context is not None:
            keys[i] = entry_key(context, record.fingerprint())
            cached = cache.get(keys[i])
            # two records with equal content share an entry: each keeps its own key (noise stream, messages)
            out[i] = replace(cached, key=record.key) if cached is not None else None
        if out[i] is None:
            missing.append(i)
        elif on_progress is not None:
            on_progress(1)
    with_empty = config.data.caption_dropout > 0
    subsets = config.data.reference_dropout > 0 and trainer.info.prompt_sees_controls
    dtype = torch_dtype(config.model)
    for start in range(0, len(missing), chunk):
        part = missing[start : start + chunk]
        samples = [load_sample(records[i], config.data, trainer.info.condition_sizing) for i in part]
        if subsets:
            encoded = encode_with_subset_prompts(trainer, encoders.get(), samples, config.model, with_empty)
        else:
            encoded = trainer.encode(encoders.get(), samples, config.model, with_empty)
        for i, sample in zip(part, encoded):
            out[i] = sample = in_dtype(sample, dtype)
            if cache is not None and keys[i] is not None:
                cache.put(keys[i], sample)
        if on_progress is not None:
            on_progress(len(part))
    return out  # type: ignore[return-value]


def control_subsets(sample: EditSample) -> list[tuple[str, EditSample]]:
    """Each proper subset of the sample's controls (the empty one included, the full set left out: 2^k - 1 for
    k controls) as (key of ``EncodedSample.subset_prompts``: the kept indices joined by ",", the sample with
    only those controls and their ``vl_controls``)."""
    k = len(sample.controls)
    out = []
    for size in range(k):
        for kept in combinations(range(k), size):
            vl = [sample.vl_controls[i] for i in kept] if sample.vl_controls else []
            out.append((",".join(str(i) for i in kept),
                        replace(sample, controls=[sample.controls[i] for i in kept], vl_controls=vl)))
    return out


def encode_with_subset_prompts(trainer: Trainer, encoders: Any, samples: list[EditSample], model: ModelConfig,
                               with_empty: bool) -> list[EncodedSample]:
    """``trainer.encode`` of ``samples``, each with its ``subset_prompts`` (and ``subset_empty_prompts`` when
    ``with_empty``): the prompt of every proper subset of its controls, for reference dropout on a trainer whose
    prompt encoding sees the controls (``TrainerInfo.prompt_sees_controls``).

    Why whole encodes: the plugin API has one encoding stage, so each subset is a copy of the sample carrying
    only those controls, encoded as any sample (one ``trainer.encode`` call for the samples and all their
    copies). The cost: each proper subset re-runs the VL encoder (prompt and empty prompt) and the VAE on the
    target and the kept controls, whose latents are thrown away; Qwen takes k <= 3 controls, so at most 7
    extra encodes per sample, paid once per cache entry."""
    per_sample = [control_subsets(s) for s in samples]
    copies = [copy for subsets in per_sample for _, copy in subsets]
    encoded = trainer.encode(encoders, samples + copies, model, with_empty)
    if len(encoded) != len(samples) + len(copies):
        raise RuntimeError(f"trainer {trainer.info.name}: encode returned {len(encoded)} samples for "
                           f"{len(samples) + len(copies)} (samples and their control subsets)")
    rest = iter(encoded[len(samples):])
    out = []
    for sample, subsets in zip(encoded[: len(samples)], per_sample):
        if subsets:
            variants = {key: next(rest) for key, _ in subsets}
            empty = {key: v.empty_prompt for key, v in variants.items() if v.empty_prompt is not None}
            sample = replace(sample, subset_prompts={key: v.prompt for key, v in variants.items()},
                             subset_empty_prompts=empty if with_empty else None)
        out.append(sample)
    return out


def in_dtype(sample: EncodedSample, dtype: torch.dtype) -> EncodedSample:
    """Latents and prompt embeddings in the model's dtype (what the step casts them to anyway): halves the
    cache and the RAM for bf16. The edit mask keeps its precision."""

    def cast_one(p: PromptEmbeds) -> PromptEmbeds:
        return PromptEmbeds(hidden=p.hidden.to(dtype), mask=p.mask,
                            pooled=p.pooled.to(dtype) if p.pooled is not None else None, image_slots=p.image_slots)

    def cast(p: PromptEmbeds | None) -> PromptEmbeds | None:
        return None if p is None else cast_one(p)

    def cast_all(prompts: dict[str, PromptEmbeds] | None) -> dict[str, PromptEmbeds] | None:
        return None if prompts is None else {key: cast_one(p) for key, p in prompts.items()}

    return replace(sample, latents=sample.latents.to(dtype), controls=[c.to(dtype) for c in sample.controls],
                   prompt=cast(sample.prompt), empty_prompt=cast(sample.empty_prompt),
                   subset_prompts=cast_all(sample.subset_prompts),
                   subset_empty_prompts=cast_all(sample.subset_empty_prompts))


class CachedSamples(Sequence):
    """Training samples read from the embedding cache on access, in the order of ``records``.

    Signatures (for bucketing) come from the entries' headers, so start-up reads no tensors. An entry found
    corrupt when its batch comes is re-encoded on the spot (loading the encoders then), never used.
    """

    def __init__(self, records: Sequence[Any], keys: list[str], cache: EmbeddingCache,
                 reencode: Callable[[Any], EncodedSample]) -> None:
        self._records, self._keys, self._cache, self._reencode = list(records), keys, cache, reencode
        self.signatures = [cache.signature(k) or reencode(r).signature for k, r in zip(keys, self._records)]

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> EncodedSample:  # type: ignore[override]
        sample = self._cache.get(self._keys[index])
        if sample is None:
            return self._reencode(self._records[index])
        return replace(sample, key=self._records[index].key)


def fill_cache(records: Sequence[Any], trainer: Trainer, encoders: LazyEncoders,
               config: QfluxConfig, cache: EmbeddingCache, context: CacheContext) -> list[str]:
    """Encode the records that have no entry yet into the cache; returns every record's key."""
    keys = [entry_key(context, r.fingerprint()) for r in records]
    encode_records([r for r, k in zip(records, keys) if k not in cache], trainer, encoders, config, cache, context)
    return keys


def prepare_samples(records: Sequence[Any], trainer: Trainer, encoders: LazyEncoders,
                    config: QfluxConfig, cache: EmbeddingCache | None, context: CacheContext | None,
                    ) -> Sequence[EncodedSample]:
    """The training samples: with a cache, every record is encoded into it (missing ones only) and read back
    lazily; without one, all are encoded into memory."""
    if cache is None or context is None:
        return encode_records(records, trainer, encoders, config)
    keys = fill_cache(records, trainer, encoders, config, cache, context)

    def reencode(record: Any) -> EncodedSample:
        """An entry found bad mid-run: encode it again, then free the encoders if only this needed them."""
        was_loaded = encoders.loaded
        sample = encode_records([record], trainer, encoders, config, cache, context)[0]
        if not was_loaded:
            encoders.release()
        return sample

    return CachedSamples(records, keys, cache, reencode)


def signatures_of(samples: Sequence[EncodedSample]) -> list[Any]:
    if isinstance(samples, CachedSamples):
        return samples.signatures
    return [s.signature for s in samples]
