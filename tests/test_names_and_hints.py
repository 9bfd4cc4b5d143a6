"""Names and hints (issue 14 "Honest reports"): did-you-mean for trainer names, the dated alias
``qwen-edit-2509``, key hints that point at the right key for names users bring from ai-toolkit / musubi-tuner,
and one line with the nearest valid values for a bad ``data.resolution``.

Before: ``kontex`` / ``flux-kontext`` got no suggestion, ``qwen-edit-2509`` was unknown, ``train.steps`` was
pointed at ``validation.steps`` and ``output_dir`` at ``output``, ``learning_rate`` / ``network`` /
``data.folder_path`` / ``model.network_alpha`` got no hint, ``resolution: [512, 768, 1024]`` gave four lines and
``500`` read ``Value error, sides must be ... got 500 (got 500)``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_fork_server import run_qflux_process

from qflux.config import load_config
from qflux.errors import ConfigError


def qflux(*args: str, cwd: Path, plugins: str = "kontext,qwen") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QFLUX_LOAD_PLUGINS=plugins, NO_COLOR="1", COLUMNS="200", TERM="dumb")
    return run_qflux_process(list(args), cwd, env, timeout=300)


@pytest.mark.parametrize(("name", "meant"), [("kontex", "kontext"), ("flux-kontext", "kontext"),
                                             ("qwen-image-edit", "qwen-edit")])
def test_misspelt_trainer_gets_did_you_mean(name: str, meant: str, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"trainer: {name}\n")
    result = qflux("config", "check", "c.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"unknown trainer '{name}'" in result.stderr and f"did you mean '{meant}'" in result.stderr, result.stderr


def test_dated_alias_is_accepted_and_listed(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("trainer: qwen-edit-2509\ndata:\n  resolution: 64\n")
    check = qflux("config", "check", "c.yaml", cwd=tmp_path)
    assert check.returncode == 0 and "ok (trainer qwen-edit-plus)" in check.stdout, check.stderr
    assert load_config(tmp_path / "c.yaml").trainer == "qwen-edit-plus"  # config.yaml and cache keys: one name
    listed = qflux("plugins", "list", cwd=tmp_path)
    assert "qwen-edit-plus (alias qwen-edit-2509)" in listed.stdout, listed.stdout
    as_json = json.loads(qflux("plugins", "list", "--json", cwd=tmp_path).stdout)
    assert as_json["aliases"] == {"qwen-edit-2509": "qwen-edit-plus"}


KEY_HINTS = {
    "train:\n  steps: 10\n": ("train.steps", "train.max_steps"),
    "output_dir: runs/x\n": ("output_dir", "output.dir"),
    "learning_rate: 0.001\n": ("learning_rate", "train.lr"),
    "train:\n  learning_rate: 0.001\n": ("train.learning_rate", "train.lr"),
    "network:\n  linear: 16\n": ("network", "model.lora"),
    "data:\n  folder_path: pairs\n": ("data.folder_path", "data.path"),
    "model:\n  network_alpha: 8\n": ("model.network_alpha", "model.lora.alpha"),
}


@pytest.mark.parametrize("text", list(KEY_HINTS))
def test_keys_of_other_tools_point_at_the_right_key(text: str, tmp_path: Path) -> None:
    key, meant = KEY_HINTS[text]
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert f"unknown key '{key}' (did you mean '{meant}'?)" in str(info.value)


def test_cli_lists_every_hint_at_once(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  steps: 10\n  learning_rate: 0.1\noutput_dir: x\n")
    result = qflux("config", "check", "c.yaml", cwd=tmp_path, plugins="")
    assert result.returncode == 2
    for line in ("'train.steps' (did you mean 'train.max_steps'?)", "'train.learning_rate' (did you mean 'train.lr'?)",
                 "'output_dir' (did you mean 'output.dir'?)"):
        assert line in result.stderr, result.stderr


@pytest.mark.parametrize(("value", "expected"), [
    ("500", "'data.resolution': sides are multiples of 16 (at least 16): 500 is not, use 496 or 512"),
    ("8", "8 is not, use 16"),
    ("[512, 770]", "770 is not, use 768 or 784"),
    ("[512, 768, 1024]", "'data.resolution': expected one int (a square's pixel budget, e.g. 512), [h, w] (a fixed "
                         "size, e.g. [512, 768]) or a list of [h, w] buckets (e.g. [[512, 512], [512, 768]]) "
                         "(got [512, 768, 1024])"),
])
def test_bad_resolution_is_one_line_with_the_nearest_values(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.resolution={value}"])
    lines = [line for line in str(info.value).splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 1 and expected in lines[0], str(info.value)
    assert "Value error" not in lines[0] and lines[0].count("got") <= 1
