"""One way to call every command (issue 14 item 8, newcomer review item 12), through real subprocesses:

- ``--debug`` works anywhere on the command line and never changes the exit code (before: only before the
  subcommand, and a user error then exited 1);
- the config file as the first argument (``qflux train FILE``) on train / data check / cache / sample, like
  ``config check FILE`` (before: ``Missing option '--config'``);
- ``-c`` short for ``--config`` everywhere (before: only on ``data check``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cli_fork_server import run_qflux_process

from qflux.testing import tiny_config, write_config


def qflux(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QFLUX_LOAD_PLUGINS="kontext", NO_COLOR="1", COLUMNS="200", TERM="dumb")
    return run_qflux_process(list(args), cwd, env, timeout=600)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A config whose run cannot start (output.dir is a file): train stops at its checks, fast."""
    (tmp_path / "taken").write_text("a file")
    config = tiny_config(tmp_path, "kontext", data={"path": "builtin:shapes", "resolution": 32, "num_samples": 2,
                                                    "holdout": 0})
    config["output"] = {"dir": str(tmp_path / "taken")}
    return write_config(tmp_path / "c.yaml", config)


@pytest.mark.parametrize("where", ["before", "after", "middle"])
def test_debug_anywhere_keeps_exit_2_and_shows_the_traceback(where: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("model:\n  lora:\n    rnk: 4\n")
    args = {"before": ["--debug", "config", "check", "bad.yaml"], "after": ["config", "check", "bad.yaml", "--debug"],
            "middle": ["config", "--debug", "check", "bad.yaml"]}[where]
    result = qflux(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert "error: " in result.stderr and "model.lora.rnk" in result.stderr


@pytest.mark.parametrize("form", ["positional", "-c", "--config"])
def test_train_takes_the_config_as_file_or_option(form: str, cfg: Path, tmp_path: Path) -> None:
    given = [str(cfg)] if form == "positional" else [form, str(cfg)]
    result = qflux("train", *given, cwd=tmp_path)
    assert result.returncode == 2 and "output.dir" in result.stderr and "is a file" in result.stderr, result.stderr


def test_every_command_takes_file_and_dash_c(cfg: Path, tmp_path: Path) -> None:
    for args, expected in [
        (["data", "check", str(cfg)], "2 samples ok"),
        (["config", "check", "-c", str(cfg)], "ok (trainer kontext)"),
        (["config", "show", "-c", str(cfg)], "trainer: kontext"),
        (["cache", "info", str(cfg)], "this config: 0/2 samples cached"),
        (["cache", "info", "-c", str(cfg)], "this config: 0/2 samples cached"),
    ]:
        result = qflux(*args, cwd=tmp_path)
        assert result.returncode == 0 and expected in result.stdout, (args, result.stdout, result.stderr[-2000:])
    for args in (["sample", str(cfg), "--prompt", "x", "--out", "result"],
                 ["sample", "-c", str(cfg), "--prompt", "x", "--out", "result"]):
        result = qflux(*args, cwd=tmp_path)  # the config was read: the --out check after it answers
        assert result.returncode == 2 and "--out result: unknown image type" in result.stderr, result.stderr[-2000:]


def test_cache_build_takes_the_file_first(cfg: Path, tmp_path: Path) -> None:
    result = qflux("cache", str(cfg), cwd=tmp_path)
    assert result.returncode == 0 and "2 samples: 2 encoded" in result.stdout, result.stderr[-2000:]


def test_two_different_config_files_are_refused(cfg: Path, tmp_path: Path) -> None:
    result = qflux("train", str(cfg), "--config", "other.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "two config files given" in result.stderr, result.stderr
    missing = qflux("train", cwd=tmp_path)
    assert missing.returncode == 2 and "no config file given: qflux train FILE" in missing.stderr, missing.stderr
