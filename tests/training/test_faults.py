"""Faults never lose work: SIGKILL + resume is bitwise exact, a corrupt latest checkpoint falls back to the
previous one, a non-finite loss stops with the last good checkpoint kept, Ctrl-C writes a checkpoint."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qflux import hookimpl
from qflux.config import load_config
from qflux.errors import TrainingStopped
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import tiny_config, write_config

STEPS = 12


def config_file(tmp: Path, name: str, **train_overrides) -> Path:
    base = tmp / name
    config = tiny_config(base, data={"caption_dropout": 0.25},
                         train={"max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2, **train_overrides})
    return write_config(tmp / f"{name}.yaml", config)


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qflux", "train", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("reference")
    code, err = finish(start(config_file(tmp, "ref")))
    assert code == 0, err[-2000:]
    return lora(tmp / "ref" / "run")


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, reference):
    config = config_file(tmp_path, "killed")
    run = tmp_path / "killed" / "run"
    proc = start(config)
    wait_for_steps(run, proc, 4)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-step, maybe mid-checkpoint
    proc.wait()
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    code, err = finish(start(config, "--resume"))
    assert code == 0, err[-2000:]
    assert "resumed from" in err
    assert_bitwise(reference, lora(run))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, reference):
    config = config_file(tmp_path, "corrupt", max_steps=STEPS)
    run = tmp_path / "corrupt" / "run"
    code, err = finish(start(config))
    assert code == 0, err[-2000:]
    # as if killed right after a damaged final checkpoint: drop the export, flip a byte of the last LoRA
    (run / "pytorch_lora_weights.safetensors").unlink()
    latest = run / "checkpoints" / f"step-{STEPS:06d}" / "lora.safetensors"
    data = bytearray(latest.read_bytes())
    data[-1] ^= 0x55
    latest.write_bytes(bytes(data))
    code, err = finish(start(config, "--resume"))
    assert code == 0, err[-2000:]
    assert f"skipping checkpoint {latest.parent}" in " ".join(err.split())
    assert f"step-{STEPS - 1:06d}" in err
    assert_bitwise(reference, lora(run))


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path, reference):
    config = config_file(tmp_path, "interrupted", save_every=0)  # only the interrupt writes a checkpoint
    run = tmp_path / "interrupted" / "run"
    proc = start(config)
    wait_for_steps(run, proc, 3)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted: checkpoint of step" in " ".join(err.split())
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(saved) == 1
    code, err = finish(start(config, "--resume"))
    assert code == 0, err[-2000:]
    assert_bitwise(reference, lora(run))


class NanAtStep:
    """Replaces the loss with NaN from the 3rd training forward on."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl(hookwrapper=True)
    def qflux_loss(self, prediction, noisy, batch, loss):
        outcome = yield
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= 3:
                outcome.force_result(outcome.get_result() * float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, train={"max_steps": 6, "save_every": 1, "batch_size": 1})))
    with pytest.raises(TrainingStopped, match=r"loss is nan at step 3") as err:
        train(config, registry=build_registry(extra_plugins=[("nan", NanAtStep())]))
    assert "step-000002" in str(err.value)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    shutil.rmtree(run)
