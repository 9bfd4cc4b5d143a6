"""Two CPU processes (gloo) through ``accelerate launch``: same LoRA on every rank, disjoint data shards,
equivalence with one process at the same global batch, and resume of a 2-process run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qflux.testing import tiny_config, write_config

SCRIPT = Path(__file__).with_name("run_rank.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch(config: Path, out: Path, processes: int, *extra: str) -> None:
    # --multi_gpu selects accelerate's torchrun launcher; without a GPU, qflux runs it on CPU with gloo
    cmd = [str(ACCELERATE), "launch", "--multi_gpu" if processes > 1 else "--cpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(SCRIPT), str(config), str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def seen(out: Path, rank: int) -> dict:
    return json.loads((out / f"seen-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # 10 samples, 2 held out -> 8 training samples = 4 global batches of 2 = one epoch in 4 steps
    config = write_config(tmp / "c.yaml", tiny_config(
        tmp, data={"num_samples": 10, "holdout": 2},
        train={"max_steps": 4, "batch_size": 1, "save_every": 2, "lr": 5e-3},
        validation={"every": 2, "steps": 2, "from_holdout": 2}))
    launch(config, tmp / "out", 2)
    return tmp, config


def test_ranks_end_with_identical_lora(two_process_run):
    tmp, _ = two_process_run
    a, b = load_file(str(tmp / "out" / "lora-rank0.safetensors")), load_file(str(tmp / "out" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert seen(tmp / "out", 0)["world"] == 2
    assert (tmp / "run" / "samples" / "step-000002.png").is_file()  # split validation sampling, gathered


def test_ranks_cover_the_epoch_without_overlap(two_process_run):
    tmp, _ = two_process_run
    r0 = [k for batch in seen(tmp / "out", 0)["batches"] for k in batch]
    r1 = [k for batch in seen(tmp / "out", 1)["batches"] for k in batch]
    assert len(r0) == len(r1) == 4
    assert not set(r0) & set(r1)
    assert len(set(r0) | set(r1)) == 8


def test_two_processes_batch_one_match_one_process_batch_two(two_process_run):
    tmp, _ = two_process_run
    single = tmp / "single"
    config = write_config(single.with_suffix(".yaml"), tiny_config(
        single, data={"num_samples": 10, "holdout": 2},
        train={"max_steps": 4, "batch_size": 2, "save_every": 0, "lr": 5e-3}))
    launch(config, single / "out", 1)
    one = load_file(str(single / "out" / "lora-rank0.safetensors"))
    two = load_file(str(tmp / "out" / "lora-rank0.safetensors"))
    # 4 AdamW steps of ~5e-3 each; all-reduce sums in another order, so allow float noise far below that
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-4), k
    assert seen(single / "out", 0)["val_end"] == pytest.approx(seen(tmp / "out", 0)["val_end"], rel=1e-4)


def test_short_last_global_batch_counts_each_sample_once(tmp_path):
    # 11 training samples, global batch 4 = 2 processes x batch 2: the last global batch holds 3 samples, split
    # 2 + 1 with loss scales 4/3 and 2/3, so the result equals one process with batch 4 (unscaled, the lone
    # sample would weigh 1/2 instead of 1/3; the old padding repeated a sample instead)
    from qflux.config import load_config
    from qflux.run.train import train

    configs = {}
    for processes, batch in ((2, 2), (1, 4)):
        root = tmp_path / f"p{processes}"
        configs[processes] = write_config(root.with_suffix(".yaml"), tiny_config(
            root, data={"num_samples": 13, "holdout": 2},
            train={"max_steps": 3, "batch_size": batch, "save_every": 0, "lr": 5e-3}))
    launch(configs[2], tmp_path / "p2" / "out", 2)
    r0 = [k for b in seen(tmp_path / "p2" / "out", 0)["batches"] for k in b]
    r1 = [k for b in seen(tmp_path / "p2" / "out", 1)["batches"] for k in b]
    assert (len(r0), len(r1)) == (6, 5) and not set(r0) & set(r1) and len(set(r0) | set(r1)) == 11
    # the one-process reference runs in this process (a launch of one process adds only start-up time)
    one = train(load_config(configs[1])).lora
    two = load_file(str(tmp_path / "p2" / "out" / "lora-rank0.safetensors"))
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-4), k


def test_two_process_run_killed_midway_resumes_to_the_same_lora(two_process_run):
    tmp, config = two_process_run
    reference = load_file(str(tmp / "out" / "lora-rank0.safetensors"))
    run = tmp / "run"
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if killed between step 2 and step 4
    (run / "pytorch_lora_weights.safetensors").unlink()
    launch(config, tmp / "resumed", 2, "--resume")
    resumed = load_file(str(tmp / "resumed" / "lora-rank0.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert sum(len(b) for b in seen(tmp / "resumed", 0)["batches"]) == 2  # only steps 3 and 4 ran


def test_two_process_qwen_edit_run_keeps_ranks_identical(tmp_path):
    config = write_config(tmp_path / "q.yaml", tiny_config(
        tmp_path, trainer="qwen-edit", data={"num_samples": 6, "holdout": 2},
        train={"max_steps": 2, "batch_size": 1, "save_every": 0, "lr": 5e-3}))
    launch(config, tmp_path / "out", 2)
    a = load_file(str(tmp_path / "out" / "lora-rank0.safetensors"))
    b = load_file(str(tmp_path / "out" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r0 = [k for batch in seen(tmp_path / "out", 0)["batches"] for k in batch]
    r1 = [k for batch in seen(tmp_path / "out", 1)["batches"] for k in batch]
    assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
