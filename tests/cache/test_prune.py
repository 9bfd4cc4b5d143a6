"""``qflux cache prune`` (issue 14 "Honest reports"): a dry run unless ``--yes``, listing what it would remove,
and it never removes the entries of another trainer sharing ``cache.dir`` unless ``--all-trainers``.

Before: ``prune`` deleted at once every entry the config did not use, a qwen-edit run's entries included, when
one cache was shared (as the recipes recommend)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from cli_fork_server import run_qflux_process

from qflux.cache.store import EmbeddingCache
from qflux.testing import tiny_config, write_config
from qflux.types import EncodedSample, PromptEmbeds


def sample(key: str) -> EncodedSample:
    return EncodedSample(key=key, latents=torch.zeros(4, 8), grid=(2, 2), prompt=PromptEmbeds(hidden=torch.zeros(3, 4)))


def test_owner_is_recorded_and_prune_keeps_other_trainers(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path, owner="kontext").put("k-used", sample("a"))
    EmbeddingCache(tmp_path, owner="kontext").put("k-stale", sample("b"))
    EmbeddingCache(tmp_path, owner="qwen-edit").put("q-entry", sample("c"))
    EmbeddingCache(tmp_path).put("old-entry", sample("d"))  # written before owners were recorded
    cache = EmbeddingCache(tmp_path)
    assert cache.owner_of("q-entry") == "qwen-edit" and cache.owner_of("old-entry") == "unknown"
    plan = cache.plan_prune(["k-used"], "kontext")
    assert plan.remove == ["k-stale"] and plan.kept_other == {"qwen-edit": 1, "unknown": 1} and plan.bytes > 0
    assert cache.prune(["k-used"], "kontext") == 1
    reopened = EmbeddingCache(tmp_path)  # the rewritten index keeps the owners
    assert reopened.keys() == ["k-used", "old-entry", "q-entry"] and reopened.owner_of("q-entry") == "qwen-edit"
    assert reopened.prune(["k-used"]) == 2 and reopened.keys() == ["k-used"]


def qflux(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QFLUX_LOAD_PLUGINS="kontext", NO_COLOR="1", COLUMNS="200", TERM="dumb")
    return run_qflux_process(list(args), cwd, env, timeout=600)


def test_prune_cli_is_a_dry_run_and_spares_other_trainers(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "kontext", data={"path": "builtin:shapes", "resolution": 32, "num_samples": 3,
                                                    "holdout": 0})
    path = write_config(tmp_path / "c.yaml", config)
    built = qflux("cache", str(path), cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    root = tmp_path / "cache"
    rows = [json.loads(line) for line in (root / "index.jsonl").read_text().splitlines()]
    assert {r["trainer"] for r in rows} == {"kontext"}
    EmbeddingCache(root, owner="qwen-edit").put("q" * 40, sample("other"))  # another trainer shares the cache
    changed = ["--set", "data.resolution=48"]  # the 3 kontext entries are no longer used

    dry = qflux("cache", "prune", str(path), *changed, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "would remove 3 entries" in dry.stdout and "add --yes to delete them" in dry.stdout, dry.stdout
    assert "1 of trainer qwen-edit" in dry.stdout and "(trainer kontext)" in dry.stdout
    assert len(EmbeddingCache(root)) == 4  # nothing deleted

    done = qflux("cache", "prune", str(path), *changed, "--yes", cwd=tmp_path)
    assert done.returncode == 0 and "removed 3 entries, 1 left" in done.stdout, done.stdout + done.stderr[-2000:]
    assert EmbeddingCache(root).keys() == ["q" * 40]

    everything = qflux("cache", "prune", str(path), *changed, "--yes", "--all-trainers", cwd=tmp_path)
    assert everything.returncode == 0 and "removed 1 entries, 0 left" in everything.stdout, everything.stdout
    assert len(EmbeddingCache(root)) == 0
