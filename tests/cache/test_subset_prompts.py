"""``EncodedSample.subset_prompts`` / ``subset_empty_prompts`` (reference dropout) survive the cache; entries
written without them still read (as None); an entry that lost a subset's tensors is undecodable (the store
re-encodes such an entry), never used."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from qflux.cache.serialize import from_bytes, read_metadata, signature_from_metadata, to_bytes
from qflux.cache.store import EmbeddingCache
from qflux.types import EncodedSample, PromptEmbeds


def prompt(seed: int, length: int, mask: bool = True, pooled: bool = False) -> PromptEmbeds:
    g = torch.Generator().manual_seed(seed)
    return PromptEmbeds(hidden=torch.randn(length, 4, generator=g),
                        mask=torch.ones(length, dtype=torch.long) if mask else None,
                        pooled=torch.randn(3, generator=g) if pooled else None)


def make_sample(subsets: bool = True) -> EncodedSample:
    g = torch.Generator().manual_seed(0)
    return EncodedSample(
        key="a", latents=torch.randn(6, 8, generator=g), grid=(2, 3), prompt=prompt(1, 5, pooled=True),
        controls=[torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)], control_grids=[(2, 2), (1, 2)],
        empty_prompt=prompt(2, 3),
        # "" (no control kept) and the single controls; distinct lengths and optional parts per subset
        subset_prompts={"": prompt(3, 2), "0": prompt(4, 6, mask=False), "1": prompt(5, 4, pooled=True)}
        if subsets else None,
        subset_empty_prompts={"": prompt(6, 1), "0": prompt(7, 2), "1": prompt(8, 2)} if subsets else None,
    )


def same_prompt(a: PromptEmbeds | None, b: PromptEmbeds | None) -> bool:
    if a is None or b is None:
        return a is b
    parts = [(a.hidden, b.hidden), (a.mask, b.mask), (a.pooled, b.pooled)]
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in parts)


def same_subsets(a: dict[str, PromptEmbeds] | None, b: dict[str, PromptEmbeds] | None) -> bool:
    if a is None or b is None:
        return a is b
    return list(a) == list(b) and all(same_prompt(a[k], b[k]) for k in a)


def round_trip(sample: EncodedSample) -> EncodedSample:
    data = to_bytes(sample)
    return from_bytes(data, read_metadata(data))


def test_subset_prompts_round_trip_in_order_with_their_keys():
    sample = make_sample()
    back = round_trip(sample)
    assert same_subsets(back.subset_prompts, sample.subset_prompts)
    assert same_subsets(back.subset_empty_prompts, sample.subset_empty_prompts)
    assert same_prompt(back.prompt, sample.prompt) and same_prompt(back.empty_prompt, sample.empty_prompt)
    data = to_bytes(sample)
    assert signature_from_metadata(read_metadata(data)) == ((2, 3), ((2, 2), (1, 2)))


def test_a_sample_without_subsets_stores_nothing_new_and_reads_back_none():
    sample = make_sample(subsets=False)
    data = to_bytes(sample)
    header = json.loads(read_metadata(data)["qflux"])
    assert set(header) == {"key", "grid", "control_grids"}  # the bytes an entry had before subset prompts
    assert not any(name.startswith("subset") for name in load_bytes(data))
    back = from_bytes(data, read_metadata(data))
    assert back.subset_prompts is None and back.subset_empty_prompts is None


def test_an_entry_written_before_subset_prompts_still_reads():
    """Written as the serializer did before (no subset keys in the header, no subset tensors)."""
    sample = make_sample(subsets=False)
    tensors = {"latents": sample.latents, "prompt.hidden": sample.prompt.hidden, "prompt.mask": sample.prompt.mask,
               "prompt.pooled": sample.prompt.pooled, "control.0": sample.controls[0], "control.1": sample.controls[1]}
    header = {"key": "a", "grid": [2, 3], "control_grids": [[2, 2], [1, 2]]}
    data = save_bytes(tensors, metadata={"format": "qflux.encoded/1", "qflux": json.dumps(header)})
    back = from_bytes(data, read_metadata(data))
    assert back.subset_prompts is None and back.empty_prompt is None and same_prompt(back.prompt, sample.prompt)


def test_shared_encodings_are_stored():
    """A trainer may hand the same tensors for two prompts; safetensors refuses shared memory unless copied."""
    sample = make_sample()
    sample.subset_empty_prompts = {"": sample.empty_prompt, "0": sample.empty_prompt, "1": sample.subset_prompts[""]}
    back = round_trip(sample)
    assert same_subsets(back.subset_empty_prompts, sample.subset_empty_prompts)


def test_through_the_store_and_an_entry_missing_a_subset_is_undecodable(tmp_path):
    cache = EmbeddingCache(tmp_path)
    sample = make_sample()
    cache.put("k", sample)
    back = EmbeddingCache(tmp_path).get("k")
    assert same_subsets(back.subset_prompts, sample.subset_prompts)
    assert same_subsets(back.subset_empty_prompts, sample.subset_empty_prompts)

    data = to_bytes(sample)
    metadata = read_metadata(data)
    tensors = {k: v for k, v in load_bytes(data).items() if not k.startswith("subset_prompts.1.")}
    broken = save_bytes(tensors, metadata=metadata)
    with pytest.raises(KeyError, match=r"subset_prompts\.1"):  # EmbeddingCache.get: reported, re-encoded
        from_bytes(broken, read_metadata(broken))
