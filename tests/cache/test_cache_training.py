"""The cache inside runs: a complete cache never loads the encoders; keys follow content and settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from cli_fork_server import run_qflux_process
from PIL import Image

from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.cache import build_cache
from qflux.run.train import train
from qflux.testing import spied_registry


class Spy:
    """Records which samples reach Trainer.encode and whether the encoders were loaded."""

    def __init__(self, forbid_encoders: bool = False) -> None:
        self.encoded: list[str] = []
        self.encoder_loads = 0
        self.forbid_encoders = forbid_encoders

    def load_encoders(self, inner, model):
        self.encoder_loads += 1
        if self.forbid_encoders:
            raise AssertionError("encoders loaded although every sample is cached")
        return inner(model)

    def encode(self, inner, encoders, samples, model, empty_prompt):
        self.encoded.extend(s.key for s in samples)
        return inner(encoders, samples, model, empty_prompt)


def make_folder_dataset(root: Path, n: int = 4) -> Path:
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(root / "training_images" / f"s{i}.png")
        Image.new("RGB", (32, 32), (120, 40 * i, 80)).save(root / "control_images" / f"s{i}.png")
        (root / "training_images" / f"s{i}.txt").write_text(f"make it colour {i}")
    return root


def config_for(tmp_path: Path, *overrides: str):
    base = {
        "trainer": "kontext",
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 2, "alpha": 2}},
        "data": {"path": str(tmp_path / "data"), "resolution": 32, "caption_dropout": 0.5,
                 "control_resolution": "target"},  # tiny models: not the pipeline's ~1 MP controls
        "cache": {"enabled": True, "dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "batch_size": 2, "save_every": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    return path, load_config(path, list(overrides))


def test_complete_cache_trains_without_loading_encoders(tmp_path):
    make_folder_dataset(tmp_path / "data")
    path, config = config_for(tmp_path)
    built = run_qflux_process(["cache", "--config", path], Path.cwd(), dict(os.environ), timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "4 encoded" in built.stdout
    spy = Spy(forbid_encoders=True)
    result = train(config, registry=spied_registry(spy))
    assert result.steps == 2 and spy.encoder_loads == 0 and spy.encoded == []


def test_changed_image_reencodes_only_that_sample_and_settings_reencode_all(tmp_path):
    data = make_folder_dataset(tmp_path / "data")
    _, config = config_for(tmp_path)
    first = Spy()
    build_cache(config, spied_registry(first))
    assert sorted(first.encoded) == ["s0", "s1", "s2", "s3"]

    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / "control_images" / "s2.png")
    second = Spy()
    report = build_cache(config, spied_registry(second))
    assert second.encoded == ["s2"] and report.encoded == 1

    (data / "training_images" / "s1.txt").write_text("a new instruction")
    third = Spy()
    build_cache(config, spied_registry(third))
    assert third.encoded == ["s1"]

    _, bigger = config_for(tmp_path, "data.resolution=48")
    fourth = Spy()
    build_cache(bigger, spied_registry(fourth))
    assert sorted(fourth.encoded) == ["s0", "s1", "s2", "s3"]

    _, other_dtype = config_for(tmp_path, "model.dtype=bfloat16")
    fifth = Spy()
    build_cache(other_dtype, spied_registry(fifth))
    assert len(fifth.encoded) == 4


def test_cached_entries_carry_empty_prompt_for_caption_dropout(tmp_path):
    from rich.console import Console

    from qflux.cache.keys import entry_key
    from qflux.data import open_records
    from qflux.run.cache import open_cache

    make_folder_dataset(tmp_path / "data")
    _, config = config_for(tmp_path)
    registry = build_registry()
    build_cache(config, registry)
    cache, context = open_cache(config, registry, Console())
    for record in open_records(config.data):
        entry = cache.get(entry_key(context, record.fingerprint()))
        assert entry is not None and entry.empty_prompt is not None
        assert entry.empty_prompt.hidden.shape == entry.prompt.hidden.shape


def test_corrupt_entry_is_reencoded_during_training(tmp_path):
    make_folder_dataset(tmp_path / "data")
    _, config = config_for(tmp_path)
    build_cache(config, build_registry())
    entries = sorted((tmp_path / "cache" / "entries").rglob("*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:-7])
    spy = Spy()
    result = train(config, registry=spied_registry(spy))
    assert result.steps == 2 and len(spy.encoded) == 1


@pytest.mark.parametrize("command", ["info", "verify", "prune"])
def test_cache_maintenance_commands(tmp_path, command):
    make_folder_dataset(tmp_path / "data")
    path, config = config_for(tmp_path)
    build_cache(config, build_registry())
    proc = run_qflux_process(["cache", command, "--config", path], Path.cwd(), dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {"info": "4/4 samples cached", "verify": "4/4 entries ok", "prune": "removed 0 entries"}[command]
    assert expected in proc.stdout
