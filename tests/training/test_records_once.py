"""``qflux train --cache`` scans the dataset once (preflight's checked records are handed to the cache build
and to the run) and reads each record's bytes for its fingerprint once (before: two scans and up to four hash
passes per record)."""

from __future__ import annotations

from collections import Counter

from PIL import Image

from qflux.data import check, records, sources
from qflux.testing import tiny_config, write_config


def _folder(root, n):
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (30 * i, 90, 140)).save(root / "training_images" / f"s{i}.png")
        Image.new("RGB", (32, 32), (140, 30 * i, 90)).save(root / "control_images" / f"s{i}.png")
        (root / "training_images" / f"s{i}.txt").write_text(f"colour {i}")
    return root


def test_train_with_cache_scans_once_and_hashes_each_record_once(tmp_path, monkeypatch):
    from qflux.cli.main import main

    n = 5
    data = _folder(tmp_path / "data", n)
    path = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, data={"path": str(data), "resolution": 32, "holdout": 1},
        train={"max_steps": 2, "batch_size": 2, "save_every": 0}))
    hashed: Counter[str] = Counter()
    scans: list[str] = []
    original_hash, original_scan = records.SampleRecord._hash, sources.scan_dataset

    def counting_hash(self):
        hashed[self.key] += 1
        return original_hash(self)

    def counting_scan(*args, **kwargs):
        scans.append("scan")
        return original_scan(*args, **kwargs)

    monkeypatch.setattr(records.SampleRecord, "_hash", counting_hash)
    monkeypatch.setattr(sources, "scan_dataset", counting_scan)
    monkeypatch.setattr(check, "scan_dataset", counting_scan)
    monkeypatch.setenv("QFLUX_LOAD_PLUGINS", "kontext")
    try:
        main(["train", "--config", str(path), "--cache"])
    except SystemExit as done:  # typer ends a successful command with exit code 0
        assert done.code in (0, None)

    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert len(scans) == 1, scans
    assert sorted(hashed) == [f"s{i}" for i in range(n)] and set(hashed.values()) == {1}, hashed
