"""FLUX.2 [klein] on two CPU processes (gloo): samples with 0, 1 and 2 references and reference dropout, so a
micro-batch splits into sub-batches of one reference layout and the processes' splits differ. ``train.fsdp``
keeps the ranks identical without a hang: every FSDP forward is a collective, so both processes must run the
same number of them. (DDP with the same data was checked once, by hand: identical ranks too; it has no per-forward
collective, so the FSDP case is the one a regression would hang.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from test_multiprocess import launch, seen  # tests/distributed is on sys.path (rootdir-less test folders)

from qflux.testing import write_config


def make_folder(root: Path) -> Path:
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i, count in enumerate([0, 1, 2, 1, 2, 0, 2, 1]):
        rng = np.random.RandomState(i)
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(root / "training_images" / f"s{i}.png")
        (root / "training_images" / f"s{i}.txt").write_text("make it red")
        for j in range(count):
            name = f"s{i}.png" if j == 0 else f"s{i}_control_{j}.png"
            Image.fromarray((rng.rand(64, 64 + 16 * j, 3) * 255).astype("uint8")).save(root / "control_images" / name)
    return root


def test_mixed_reference_layouts_keep_two_processes_identical(tmp_path):
    config = write_config(tmp_path / "c.yaml", {
        "trainer": "flux2-klein",
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "max_sequence_length": 32,
                  "lora": {"rank": 4, "alpha": 4, "targets": ["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]}},
        "data": {"path": str(make_folder(tmp_path / "data")), "resolution": 64, "holdout": 0,
                 "mixed_controls": True, "reference_dropout": 0.3},
        "cache": {"enabled": True, "dir": str(tmp_path / "cache")},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 5e-3, "save_every": 0, "seed": 0, "fsdp": True},
        "validation": {"every": 0},
        "output": {"dir": str(tmp_path / "run")},
    })
    launch(config, tmp_path / "out", 2)
    a = load_file(str(tmp_path / "out" / "lora-rank0.safetensors"))
    b = load_file(str(tmp_path / "out" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    r0, r1 = seen(tmp_path / "out", 0), seen(tmp_path / "out", 1)
    keys0 = [k for batch in r0["batches"] for k in batch]
    keys1 = [k for batch in r1["batches"] for k in batch]
    # a process whose micro-batch splits into fewer layouts than the other's repeats a sample with weight 0, so
    # both make the same number of forwards (each one a collective under FSDP)
    assert set(keys0) | set(keys1) == {f"s{i}" for i in range(8)}
    assert r0["forwards"] == r1["forwards"] and len(r0["batches"]) == len(r1["batches"]) > 3
