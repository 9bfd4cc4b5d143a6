"""EmbeddingCache: round trip, verification of corrupt / truncated entries, index-only start-up, concurrency."""

import multiprocessing as mp
from pathlib import Path

import torch

from qflux.cache.store import EmbeddingCache
from qflux.types import EncodedSample, PromptEmbeds


def make_sample(key: str, seed: int = 0) -> EncodedSample:
    g = torch.Generator().manual_seed(seed)
    return EncodedSample(
        key=key,
        latents=torch.randn(6, 8, generator=g),
        grid=(2, 3),
        prompt=PromptEmbeds(hidden=torch.randn(5, 4, generator=g), mask=torch.ones(5, dtype=torch.long),
                            pooled=torch.randn(3, generator=g)),
        controls=[torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)],
        control_grids=[(2, 2), (1, 2)],
        mask=torch.rand(6, generator=g),
        empty_prompt=PromptEmbeds(hidden=torch.zeros(5, 4)),
    )


def assert_same(a: EncodedSample, b: EncodedSample) -> None:
    assert a.key == b.key and a.grid == b.grid and a.control_grids == b.control_grids
    assert torch.equal(a.latents, b.latents) and torch.equal(a.mask, b.mask)
    assert all(torch.equal(x, y) for x, y in zip(a.controls, b.controls))
    assert torch.equal(a.prompt.hidden, b.prompt.hidden) and torch.equal(a.prompt.pooled, b.prompt.pooled)
    assert torch.equal(a.prompt.mask, b.prompt.mask) and torch.equal(a.empty_prompt.hidden, b.empty_prompt.hidden)
    assert b.empty_prompt.pooled is None


def test_round_trip_and_reopen(tmp_path):
    cache = EmbeddingCache(tmp_path)
    sample = make_sample("a")
    cache.put("k1", sample)
    assert_same(sample, cache.get("k1"))
    reopened = EmbeddingCache(tmp_path)  # from the index alone
    assert "k1" in reopened and len(reopened) == 1
    assert_same(sample, reopened.get("k1"))
    assert reopened.get("other") is None


def test_corrupt_and_truncated_entries_are_detected_never_used(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put("flip", make_sample("a"))
    cache.put("cut", make_sample("b"))
    flip, cut = cache.path_of("flip"), cache.path_of("cut")
    data = bytearray(flip.read_bytes())
    data[-3] ^= 0xFF  # same size, one tensor byte changed
    flip.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-10])
    warnings: list[str] = []
    reopened = EmbeddingCache(tmp_path, warn=warnings.append)
    assert {p.key for p in reopened.verify()} == {"flip", "cut"}
    assert reopened.get("flip") is None and reopened.get("cut") is None
    assert len(warnings) == 2 and all("re-encoding" in w for w in warnings)
    assert not flip.exists() and not cut.exists()  # dropped, so the next put re-creates them


def test_torn_index_line_is_ignored(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put("k", make_sample("a"))
    with (tmp_path / "index.jsonl").open("a") as f:
        f.write('{"key": "half')
    assert EmbeddingCache(tmp_path).get("k") is not None


def test_prune_keeps_only_listed(tmp_path):
    cache = EmbeddingCache(tmp_path)
    for k in ("a", "b", "c"):
        cache.put(k, make_sample(k))
    assert cache.prune(["b"]) == 2
    reopened = EmbeddingCache(tmp_path)
    assert reopened.keys() == ["b"] and not cache.path_of("a").exists()


def _writer(root: str, worker: int) -> None:
    cache = EmbeddingCache(Path(root))
    for i in range(30):
        cache.put(f"key{i}", make_sample(f"s{i}", seed=i))  # both workers write the same keys


def test_two_processes_filling_one_cache_leave_it_correct(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = EmbeddingCache(tmp_path)
    assert len(cache) == 30 and cache.verify() == []
    for i in range(30):
        assert_same(make_sample(f"s{i}", seed=i), cache.get(f"key{i}"))
