"""One check list (issue 14 item 6): ``qflux config check`` and ``qflux data check`` refuse what ``qflux train``
refuses before it reads data (``qflux.run.preflight.check_config``), and ``model.lora.targets`` is checked
against the transformer built on the meta device before anything is encoded.

Before: ``config check`` / ``data check`` said ok to ``resize: fixed`` with a bucket list and to a target typo;
``train`` found the typo only after encoding the whole dataset into the cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cli_fork_server import run_qflux_process

from qflux.testing import tiny_config, write_config

PLUGINS = "kontext,qwen"

# (--set overrides, trainer, fragments of the one error line)
REFUSED = {
    "resize-fixed-with-buckets": (["data.resize=fixed", "data.resolution=[[32, 32], [32, 48]]"], "kontext",
                                  ["data.resize: 'fixed' needs data.resolution as an int or [h, w]"]),
    "control-resolution-zero": (["data.control_resolution=0"], "kontext", ["data.control_resolution"]),
    "lora-target-typo-kontext": (["model.lora.targets=[to_q, to_kk]"], "kontext",
                                 ["model.lora.targets: no module named 'to_kk' in FluxTransformer2DModel",
                                  "did you mean 'to_k'?"]),
    "lora-target-typo-qwen": (["model.lora.targets=[to_q, img_mlp.net.22]"], "qwen-edit-plus",
                              ["model.lora.targets: no module named 'img_mlp.net.22' in QwenImageTransformer2DModel"]),
}


def qflux(*args: str, cwd: Path, plugins: str = PLUGINS) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QFLUX_LOAD_PLUGINS=plugins, NO_COLOR="1", COLUMNS="200", TERM="dumb")
    return run_qflux_process(list(args), cwd, env, timeout=600)


def one_error(result: subprocess.CompletedProcess[str], fragments: list[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("error: ") == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def small_config(tmp: Path, trainer: str = "kontext") -> Path:
    config = tiny_config(tmp, trainer, data={"path": "builtin:shapes", "resolution": 32, "num_samples": 2,
                                             "holdout": 0}, train={"max_steps": 1, "batch_size": 1, "save_every": 0})
    return write_config(tmp / "c.yaml", config)


@pytest.mark.parametrize(("command", "case"), [(["config", "check"], case) for case in REFUSED] +
                         [(["data", "check"], "resize-fixed-with-buckets"), (["data", "check"], "lora-target-typo-kontext")])
def test_checks_refuse_what_train_refuses(case: str, command: list[str], tmp_path: Path) -> None:
    overrides, trainer, fragments = REFUSED[case]
    path = small_config(tmp_path, trainer)
    sets = [a for o in overrides for a in ("--set", o)]
    one_error(qflux(*command, str(path), *sets, cwd=tmp_path), fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


def test_lora_targets_of_a_model_folder_are_checked_from_its_config(tmp_path: Path) -> None:
    """A diffusers folder: the class from model_index.json, the config from transformer/config.json (a folder
    without weights is enough: none are read)."""
    from qflux_kontext.tiny import save_tiny

    folder = save_tiny(tmp_path / "model")
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    path = small_config(tmp_path)
    one_error(qflux("config", "check", str(path), "--set", f"model.pretrained={folder}",
                    "--set", "model.lora.targets=[to_q, to_kk]", cwd=tmp_path),
              ["no module named 'to_kk' in FluxTransformer2DModel", "did you mean 'to_k'?"])
    ok = qflux("config", "check", str(path), "--set", f"model.pretrained={folder}",
               "--set", "model.lora.targets=[to_q, ff.net.2, proj_mlp]", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_train_refuses_a_target_typo_before_any_cache_entry_is_written(tmp_path: Path) -> None:
    path = small_config(tmp_path)
    result = qflux("train", str(path), "--set", "model.lora.targets=[to_q, to_kk]", cwd=tmp_path)
    one_error(result, ["no module named 'to_kk'"])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_data_check_without_the_trainer_plugin_still_checks_the_data_settings(tmp_path: Path) -> None:
    """``data check`` needs no model: without the trainer's package it skips what needs it, not the rest."""
    path = small_config(tmp_path)
    ok = qflux("data", "check", str(path), "--set", "model.lora.targets=[to_kk]", cwd=tmp_path, plugins="")
    assert ok.returncode == 0, ok.stderr[-2000:]
    one_error(qflux("data", "check", str(path), "--set", "data.resize=fixed",
                    "--set", "data.resolution=[[32, 32], [32, 48]]", cwd=tmp_path, plugins=""), ["data.resize"])
