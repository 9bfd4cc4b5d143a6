"""One run per output folder (``qflux.run.lock``): a second ``qflux train`` into the folder of a live run is
refused before any work with exit 2 naming the holder; a killed run leaves no stale lock; ``train()`` releases
the lock when it returns or fails, and a failed run leaves no folder it created.

Before the lock, two runs started two seconds apart into one ``output.dir`` both finished with exit 0, their
rows interleaved in ``metrics.jsonl`` and their checkpoints overwriting each other's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qflux.errors import UserError
from qflux.run.lock import LOCK_FILE, RunLock, check_free, held
from qflux.run.train import train
from qflux.testing import tiny_config, write_config

ENV = {**os.environ, "QFLUX_LOAD_PLUGINS": "kontext", "COLUMNS": "200", "NO_COLOR": "1"}

# `qflux train` (the real CLI: preflight, then the lock, then the run) whose trainer pauses in the training
# forward of step 2, after step 1's checkpoint and metrics row, and writes a flag file when it does
PAUSED_TRAIN = """
import sys, time
from pathlib import Path
import torch
import qflux.plugins
from qflux.cli.main import main
from qflux.testing import wrap_trainer

config, flag = sys.argv[1], Path(sys.argv[2])
real = qflux.plugins.build_registry
forwards = []

def predict(inner, transformer, batch, noisy, model):
    if torch.is_grad_enabled():
        forwards.append(1)
        if len(forwards) == 2:
            flag.write_text("paused")
            time.sleep(600)
    return inner(transformer, batch, noisy, model)

def build(*args, **kwargs):
    registry = real(*args, **kwargs)
    for name in list(registry.trainers):
        wrap_trainer(registry, name, predict=predict)
    return registry

qflux.plugins.build_registry = build
sys.argv = ["qflux", "train", "--config", config]
main()
"""


def qflux_train(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qflux", "train", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def holder(run: Path) -> dict:
    try:
        return json.loads((run / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def refusal(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 2, "save_every": 1}))
    run, flag = tmp_path / "run", tmp_path / "paused"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN, str(config), str(flag)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (flag.exists() and holder(run).get("pid") == first.pid):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run did not reach step 2"
            time.sleep(0.1)
        assert holder(run)["host"] == socket.gethostname()
        before = digest(run)  # the first run is paused: nothing may change now
        # a second run, and a second run with --resume (a scheduler retrying the job), at the same time
        second, resumed = qflux_train(config), qflux_train(config, "--resume")
        for proc in (second, resumed):
            line = refusal(proc)
            assert f"error: output.dir {run} is in use by another qflux run (pid {first.pid} on host " \
                   f"{socket.gethostname()}, started " in line, line
            assert line.endswith("wait for it or choose another output.dir"), line
        assert digest(run) == before  # metrics.jsonl holds the first run's row only, its lock file its pid
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1]
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup: the kernel drops the lock with the process
        first.communicate()
    assert holder(run)["pid"] == first.pid  # the file stays behind, unlocked: no stale lock
    check_free(run)
    third = qflux_train(config, "--resume")  # takes the folder over and continues from step 1's checkpoint
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    assert "resumed from" in err and (run / "pytorch_lora_weights.safetensors").is_file()
    assert not (run / LOCK_FILE).exists()  # released and removed at the end


# --------------------------------------------------------------------------- in one process


def hold(folder: Path, pid: int = 4321) -> int:
    """Another holder of ``folder``'s lock: an open file description of its own, locked, naming ``pid``."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid, "host": "h", "started": "2026-12-03 12:01:02"}).encode())
    return fd


def test_the_lock_names_its_holder_is_reentrant_and_is_removed_on_release(tmp_path):
    folder = tmp_path / "new" / "run"
    with RunLock(folder):
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        with RunLock(folder):  # qflux train takes it, then train() takes it again
            assert held(folder)
        assert held(folder) and (folder / LOCK_FILE).exists()
        check_free(folder)  # this process holds it: no refusal
    assert not held(folder)
    assert not (tmp_path / "new").exists()  # it created the folders and nothing else was written there
    with RunLock(folder):
        (folder / "metrics.jsonl").write_text("{}\n")
    assert [p.name for p in folder.iterdir()] == ["metrics.jsonl"]


def test_a_refused_run_leaves_the_holders_lock_file_alone(tmp_path):
    folder = tmp_path / "run"
    fd = hold(folder)
    try:
        before = (folder / LOCK_FILE).read_bytes()
        message = "output.dir .* is in use by another qflux run \\(pid 4321 on host h, started 2026-12-03 12:01:02\\)"
        with pytest.raises(UserError, match=message):
            check_free(folder)
        with pytest.raises(UserError, match=message):
            RunLock(folder).acquire()
        assert (folder / LOCK_FILE).read_bytes() == before and not held(folder)
    finally:
        os.close(fd)
    with RunLock(folder):  # the holder is gone: the next run takes the same file
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_file_removed_by_its_last_holder_is_not_shared(tmp_path):
    """A run that opened the file just before its holder removed it would lock an orphan: it takes the new one."""
    folder = tmp_path / "run"
    folder.mkdir()
    orphan = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    (folder / LOCK_FILE).unlink()
    fcntl.flock(orphan, fcntl.LOCK_EX)  # someone holds the orphan: not the lock of the folder any more
    try:
        with RunLock(folder):
            assert (folder / LOCK_FILE).exists() and held(folder)
    finally:
        os.close(orphan)


def test_train_is_refused_for_api_callers_and_releases_the_lock_when_it_ends(tmp_path, make_config):
    config = make_config(train={"max_steps": 1, "save_every": 0})
    run = Path(config.output.dir)
    fd = hold(run)
    try:
        with pytest.raises(UserError, match="is in use by another qflux run \\(pid 4321"):
            train(config)
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    finally:
        os.close(fd)
    (run / LOCK_FILE).unlink()
    train(config)  # now it runs, and releases the lock when it returns
    assert not held(run) and not (run / LOCK_FILE).exists()
    again = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2})})
    with pytest.raises(UserError, match="already holds a run"):  # the next train() in this process: not the lock
        train(again)
    assert not held(run)


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, make_config, monkeypatch):
    config = make_config(train={"max_steps": 1, "save_every": 0})
    import qflux.run.setup as setup

    def broken(run, resume):
        assert held(run.output_dir)  # taken before any work
        raise UserError("model.pretrained: cannot be reached")

    monkeypatch.setattr(setup, "resume_from", broken)
    with pytest.raises(UserError, match="cannot be reached"):
        train(config)
    assert not Path(config.output.dir).exists() and not held(config.output.dir)
