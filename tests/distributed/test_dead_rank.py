"""A dead rank does not hang the others: two CPU processes (gloo) through ``accelerate launch``, rank 1
SIGKILLed mid-step and then mid-validation (deterministically, by a spy in run_dead_rank.py). Each time the
launch ends non-zero within seconds, the last good checkpoint is intact, and ``--resume`` with two processes
continues to the end. Where a launcher does not tear the group down, ``train.collective_timeout`` bounds the
wait of the survivors (here: the rendezvous of a rank whose peer never comes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from qflux.testing import tiny_config, write_config
from qflux.training import checkpoint as ckpt

SCRIPT = Path(__file__).with_name("run_dead_rank.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
BOUND = 120  # seconds from the death of rank 1 to the end of the launch (measured: 1-3 s)


def launch(config: Path, out: Path, point: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """The launch, and the time it took to end after rank 1 died (0 when none died)."""
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(SCRIPT), str(config), str(out), point, *extra]
    env = {**os.environ, "QFLUX_LOAD_PLUGINS": "kontext"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    ended = time.time()
    dead = out / "dead.json"
    return proc, (ended - json.loads(dead.read_text())["time"]) if dead.is_file() else 0.0


def steps(run: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run)]


def assert_intact(checkpoint: Path) -> None:
    assert ckpt.verify(checkpoint) is None
    state = ckpt.load_checkpoint(checkpoint)
    assert state.lora and all(torch.isfinite(t).all() for t in state.lora.values())


def test_a_dead_rank_ends_the_run_and_resume_continues(tmp_path):
    # 6 samples, 2 held out: 4 training samples = 2 global batches of 2 (batch 1 per rank); a checkpoint every
    # step; validation (held-out loss, then images split over the ranks and gathered) at steps 0, 2 and the end
    config = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, data={"num_samples": 6, "holdout": 2},
        train={"max_steps": 4, "batch_size": 1, "save_every": 1, "keep_checkpoints": 5},
        validation={"every": 2, "steps": 2, "from_holdout": 2}))
    run = tmp_path / "run"

    # (a) rank 1 dies in its 3rd training forward: rank 0 waits in the gradient all-reduce of step 3
    proc, after = launch(config, tmp_path / "a", "step:3")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "SIGKILL" in proc.stderr
    assert 0 < after < BOUND, after
    assert steps(run) == ["step-000001", "step-000002"]  # nothing of step 3
    assert_intact(run / "checkpoints" / "step-000002")
    assert not (run / "pytorch_lora_weights.safetensors").exists()

    # (b) resumed, rank 1 dies in the final validation's sampling: rank 0 waits in the gather of the images
    proc, after_validation = launch(config, tmp_path / "b", "validation", "--resume")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "dead.json").read_text())["where"] == "validation sample"
    assert 0 < after_validation < BOUND, after_validation
    assert steps(run) == ["step-000001", "step-000002", "step-000003"]  # step 4 is saved after its validation
    assert_intact(run / "checkpoints" / "step-000003")
    assert not (run / "pytorch_lora_weights.safetensors").exists()

    # (c) resumed again with two processes: it finishes, both ranks with the same LoRA, which is the export
    proc, _ = launch(config, tmp_path / "c", "none", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "c" / "lora-rank0.safetensors")), load_file(str(tmp_path / "c" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps(run)[-1] == "step-000004" and (run / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "resumed_from" in r] == [2, 3]
    assert not (run / ".qflux-run.lock").exists()  # released and removed at the end
    print(f"launch ended {after:.1f} s after rank 1 died mid-step, {after_validation:.1f} s mid-validation")


def test_collective_timeout_bounds_the_wait_for_a_missing_rank(tmp_path):
    """Rank 0 of a world of 2 whose rank 1 never comes (what a survivor sees when no launcher ends it): with
    train.collective_timeout 0.02 min it stops after about 1 s, not after the backend's 30 min."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"collective_timeout": 0.02}))
    code = ("import sys, time\n"
            "from qflux.config import load_config\n"
            "from qflux.run.setup import start\n"
            "began = time.monotonic()\n"
            "try:\n"
            "    start(load_config(sys.argv[1]), None, None)\n"
            "except Exception as err:\n"
            "    print('stopped after', round(time.monotonic() - began, 1), type(err).__name__, err)\n")
    env = {**os.environ, "QFLUX_LOAD_PLUGINS": "kontext", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.stdout.startswith("stopped after"), proc.stdout + proc.stderr[-3000:]
    waited = float(proc.stdout.split()[2])
    assert 0.5 < waited < 20, proc.stdout
    assert "Timed out" in proc.stdout or "timeout" in proc.stdout.lower(), proc.stdout



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
