"""A finished run is never overwritten, and ``--resume`` never starts from step 0 without a word.

Before this guard, ``qflux train`` into the folder of a run finished with ``train.save_every: 0`` replaced its
LoRA and ``config.yaml`` and appended a second run to ``metrics.jsonl`` (exit 0); ``--resume`` into such a
folder, an empty one or a missing one trained from step 0 (exit 0). The CLI is run in a subprocess, as a user
runs it; the loop's own guard (for API callers) is called in-process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from cli_fork_server import run_qflux_process

from qflux.config import load_config
from qflux.errors import UserError
from qflux.run.train import train
from qflux.testing import tiny_config, write_config
from qflux.training import run_folder


def qflux_train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QFLUX_LOAD_PLUGINS": "kontext", "COLUMNS": "200", "NO_COLOR": "1"}
    return run_qflux_process(["train", "--config", config, *extra], Path.cwd(), env, timeout=400)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder``: relative path -> sha256 (what a refused command must leave as it was)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A run finished with ``train.save_every: 0``: a LoRA, config.yaml, metrics.jsonl, no checkpoint."""
    tmp = tmp_path_factory.mktemp("finished")
    config = write_config(tmp / "c.yaml", tiny_config(tmp, train={"max_steps": 2, "save_every": 0}))
    done = qflux_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp / "run"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and not (run / "checkpoints").exists()
    return config, run


def test_second_train_into_a_finished_run_is_refused(finished):
    config, run = finished
    before = digest(run)
    again = qflux_train(config, "--set", "train.seed=5")
    assert again.returncode == 2, again.stderr[-3000:]
    message = flat(again.stderr)
    assert "Traceback" not in message
    assert f"output.dir {run} already holds a run" in message
    assert "pytorch_lora_weights.safetensors, metrics.jsonl, config.yaml" in message
    assert "--resume cannot continue it" in message and "choose another output.dir" in message
    assert digest(run) == before  # the LoRA, config.yaml and metrics.jsonl are untouched


def test_resume_of_a_finished_run_without_checkpoints_says_why(finished):
    config, run = finished
    before = digest(run)
    resumed = qflux_train(config, "--resume")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    message = flat(resumed.stderr)
    assert "holds a finished run without checkpoints" in message
    assert "train.save_every: 0" in message and "cannot be continued" in message
    assert digest(run) == before


def test_resume_into_a_missing_folder_says_there_is_nothing_to_resume(finished):
    config, _ = finished
    nowhere = config.parent / "nowhere"
    resumed = qflux_train(config, "--resume", "--set", f"output.dir={nowhere}")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "holds no run to continue" in flat(resumed.stderr) and "drop --resume" in flat(resumed.stderr)
    assert not nowhere.exists()


def test_the_loop_refuses_the_same_for_api_callers(finished):
    config_file, run = finished
    config = load_config(config_file)
    before = digest(run)
    with pytest.raises(UserError, match="already holds a run"):
        train(config)
    with pytest.raises(UserError, match="without checkpoints"):
        train(config, resume=True)
    empty = config_file.parent / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no run to continue"):
        train(config.model_copy(update={"output": config.output.model_copy(update={"dir": str(empty)})}),
              resume=True)
    assert digest(run) == before and not any(empty.iterdir())


# --------------------------------------------------------------------------- the folder rules, without training


def test_each_run_file_counts_and_other_files_do_not(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "tensorboard").mkdir()
    assert not run_folder.inspect_folder(tmp_path).holds_run
    for make in (lambda: (tmp_path / "metrics.jsonl").write_text(""),
                 lambda: (tmp_path / "config.yaml").write_text("trainer: kontext\n"),
                 lambda: (tmp_path / "samples").mkdir() or (tmp_path / "samples" / "step-000000.png").write_bytes(b"")):
        make()
        assert run_folder.inspect_folder(tmp_path).holds_run
    with pytest.raises(UserError, match="stopped before its first checkpoint: remove the folder"):
        run_folder.resume_point(tmp_path, False, print)
    with pytest.raises(UserError, match="--resume: .* stopped before its first checkpoint"):
        run_folder.resume_point(tmp_path, True, print)


def test_a_lone_config_yaml_is_pointed_out(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer: kontext\n")
    with pytest.raises(UserError, match="if config.yaml is your own config file, keep it outside output.dir"):
        run_folder.resume_point(tmp_path, False, print)


def test_resume_with_only_corrupt_checkpoints_is_refused(tmp_path):
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)  # no manifest: unusable
    warned = []
    with pytest.raises(UserError, match=r"no usable checkpoint .*step-000002: missing or unreadable manifest"):
        run_folder.resume_point(tmp_path, True, warned.append)
    assert warned and "skipping checkpoint" in warned[0]
    with pytest.raises(UserError, match="pass --resume to continue it"):
        run_folder.resume_point(tmp_path, False, print)


def test_resume_from_another_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    elsewhere = tmp_path / "other" / "checkpoints" / "step-000002"
    elsewhere.mkdir(parents=True)
    with pytest.raises(UserError, match="holds another run"):
        run_folder.resume_point(tmp_path / "run", elsewhere, print)
    assert run_folder.resume_point(tmp_path / "new", elsewhere, print) == elsewhere
