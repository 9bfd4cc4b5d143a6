"""``train.fsdp`` on a diffusers folder with two CPU processes (gloo): each process reads only its shards of the
frozen base (``qflux.training.sharded_load``), ends up with exactly what a whole load gives (weights, buffers,
rotary tables, the adapter's initial values, DoRA magnitudes, the RNG state), and trains to exactly the LoRA of
the same run loading the whole base in every process before sharding it (the path it replaces)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qflux.testing import tiny_config, write_config

SCRIPT = Path(__file__).with_name("run_sharded_load.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def settings(folder: Path) -> dict:
    # 8 training samples: 4 global batches of 2 (two processes x 1) = 4 steps, validation loss at the start and end
    return dict(model={"pretrained": str(folder), "dtype": "float32", "gradient_checkpointing": True,
                       "lora": {"rank": 4, "alpha": 4, "dora": True}},
                data={"num_samples": 10, "holdout": 2}, validation={"every": 4, "steps": 1, "from_holdout": 0},
                train={"max_steps": 4, "batch_size": 1, "save_every": 0, "lr": 5e-3, "fsdp": True})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from qflux_kontext.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("sharded")
    folder = save_tiny(tmp / "model")
    # every other tensor bf16 on disk: those are read and cast (float32 in the run), the others read straight in
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v.to(torch.bfloat16) if i % 2 else v for i, (k, v) in enumerate(sorted(tensors.items()))},
              str(weights), metadata={"format": "pt"})
    runs = [(write_config(tmp / f"{name}.yaml", tiny_config(tmp / name, **settings(folder))), tmp / name)
            for name in ("out", "whole")]
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(SCRIPT), *(str(path) for run in runs for path in run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, folder


def seen(out: Path, rank: int) -> dict:
    return json.loads((out / f"seen-rank{rank}.json").read_text())


def loaded(tmp: Path, rank: int) -> dict:
    return json.loads((tmp / "out" / f"load-rank{rank}.json").read_text())


def test_each_process_reads_and_holds_only_its_half_of_the_frozen_base(runs):
    tmp, _ = runs
    for rank in (0, 1):
        info = loaded(tmp, rank)
        report = info["report"]
        base, on_disk = report["base_bytes"], report["file_bytes"]
        assert base > 1_000_000 and base / 2 < on_disk < base  # float32 in the run, half of it bf16 in the file
        # the frozen base was never materialised: stand-ins of one element each when the adapter attached...
        assert info["frozen_at_attach"] < 4096
        # ...then this process's shards only (FSDP pads the last rows: a little over half)
        assert info["all_sharded"] and info["local_shard_bytes"] == pytest.approx(base / 2, rel=0.03)
        # read from the files: half of the weights' bytes, the float32 ones straight into the shards, the bf16
        # ones through one temporary slice at a time
        assert info["read"] == report["read_bytes"] + report["buffer_bytes"]
        assert report["read_bytes"] == pytest.approx(on_disk / 2, rel=0.03)
        assert 0 < info["into_shards"] < info["read"]
        assert 0 < info["peak_alive"] <= report["largest_read"] < on_disk / 8
        assert report["files"] == ["diffusion_pytorch_model.safetensors"]


def test_sharded_load_gives_the_state_of_a_whole_load(runs):
    tmp, _ = runs
    for rank in (0, 1):
        info = loaded(tmp, rank)
        assert info["params"] > 100 and info["params_differing"] == []  # frozen weights, LoRA, DoRA magnitudes
        assert info["buffers_differing"] == [] and info["attrs_differing"] == []
        assert info["rng_equal"] and info["adapter_order_equal"] and info["grad_checkpointing"]
        assert info["dtypes"] == ["torch.float32"]


def test_sharded_load_trains_exactly_like_the_whole_load_it_replaces(runs):
    # the same train.fsdp run, every process loading the whole base and sharding it afterwards (the path before
    # the sharded load, whose results test_fsdp.py checks against DDP): the same weights, the same adapter
    # initialisation, the same sharding, so the same numbers to the bit
    tmp, _ = runs
    a = load_file(str(tmp / "out" / "lora-rank0.safetensors"))
    b = load_file(str(tmp / "out" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_magnitude_vector" in k for k in a)
    assert not (tmp / "whole" / "load-rank0.json").exists()  # that run did not take the sharded load
    whole = load_file(str(tmp / "whole" / "lora-rank0.safetensors"))
    assert whole.keys() == a.keys() and all(torch.equal(a[k], whole[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    mine, theirs = seen(tmp / "out", 0), seen(tmp / "whole", 0)
    assert mine["val_end"] == theirs["val_end"] and mine["val_end"] != mine["val_start"]
    assert mine["batches"] == theirs["batches"] and mine["forwards"] == theirs["forwards"]
    assert mine["base_local"] == theirs["base_local"] == pytest.approx(mine["base_total"] / 2, rel=0.02)


def test_weights_reads_any_rows_of_a_folder_saved_in_several_files(tmp_path):
    # a diffusers folder split in files with an index (as the real models are): rows from the middle of every
    # tensor, straight into a given tensor or into a new one, equal the tensors as diffusers saved them
    import contextlib

    from qflux.training.sharded_load import INDEX, Weights
    from qflux_kontext.tiny import tiny_transformer

    model = tiny_transformer().to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / INDEX).is_file()
    state = model.state_dict()
    with contextlib.ExitStack() as stack:
        weights = Weights(tmp_path, stack)
        assert len(weights.files) > 2 and set(weights.entries) == set(state)
        for name, tensor in state.items():
            assert weights.entries[name].shape == tuple(tensor.shape)
            rows = tensor.shape[0] // 3 if tensor.dim() else None
            row = tensor.shape[0] // 3 if tensor.dim() else 0
            got = weights.read(name, row, rows)
            expected = tensor[row : row + rows] if tensor.dim() else tensor
            assert got.dtype == tensor.dtype and torch.equal(got, expected), name
            into = torch.empty_like(tensor)
            assert weights.read(name, out=into) is into and torch.equal(into, tensor)
