"""A resume applies changed hyper-parameters (and says which), refuses what it cannot change (naming the keys),
and has nothing to do past ``train.max_steps``.

Before: ``--resume --set train.lr=5e-4`` trained on at the checkpoint's lr (the optimizer and scheduler state
dicts, restored after being built from the new config, brought the old values back) while ``config.yaml``
recorded 5e-4; a changed ``weight_decay`` was dropped the same way; a resume of a complete run re-rendered its
samples and re-exported its LoRA (exit 0, no word).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from cli_fork_server import run_qflux_process

from qflux.config import load_config
from qflux.errors import ConfigError, UserError
from qflux.run.preflight import check_output
from qflux.run.train import train
from qflux.testing import tiny_config, write_config
from qflux.training.metrics import read_metrics

STEPS = 4


def qflux_train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QFLUX_LOAD_PLUGINS": "kontext", "COLUMNS": "200", "NO_COLOR": "1"}
    return run_qflux_process(["train", "--config", config, *extra], Path.cwd(), env, timeout=400)


def flat(text: str) -> str:
    return " ".join(text.split())


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> Path:
    """A run complete at step 4: checkpoints at 2 and 4, its LoRA exported (lr 1e-3, weight_decay 1e-4)."""
    tmp = tmp_path_factory.mktemp("complete")
    config = write_config(tmp / "c.yaml", tiny_config(tmp, train={"max_steps": STEPS, "save_every": 2,
                                                                  "weight_decay": 1e-4}))
    done = qflux_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


@pytest.fixture
def copy(complete, tmp_path) -> Path:
    """A copy of the complete run (its config points at the copy's folder; the cache is shared)."""
    shutil.copytree(complete / "run", tmp_path / "run")
    config = yaml.safe_load((complete / "c.yaml").read_text())
    config["output"]["dir"] = str(tmp_path / "run")
    return write_config(tmp_path / "c.yaml", config)


def test_resume_applies_a_lowered_lr_and_a_new_weight_decay(copy):
    run = copy.parent / "run"
    resumed = qflux_train(copy, "--resume", "--set", "train.max_steps=6", "--set", "train.lr=5e-4",
                          "--set", "train.weight_decay=0.5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["lr"] for r in rows if "lr" in r and r["step"] > STEPS] == [5e-4, 5e-4]  # was 1e-3 before the fix
    state = torch.load(run / "checkpoints" / "step-000006" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.5  # was 1e-4
    assert state["lr_scheduler"]["base_lrs"] == [5e-4]
    said = flat(resumed.stderr)
    assert "resuming at step 4 with changed settings" in said
    assert "train.lr: 0.001 -> 0.0005" in said and "train.weight_decay: 0.0001 -> 0.5" in said
    assert "train.max_steps: 4 -> 6" in said
    record = [r for r in rows if "resumed_from" in r]
    assert len(record) == 1 and record[0]["step"] == STEPS
    assert record[0]["changed"]["train.lr"] == [1e-3, 5e-4]
    written = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert written["lr"] == 5e-4 and written["weight_decay"] == 0.5  # config.yaml says what ran


def test_resume_of_a_complete_run_has_nothing_to_do(copy):
    run = copy.parent / "run"
    before = mtimes(run)
    for max_steps in (STEPS, 2):
        again = qflux_train(copy, "--resume", "--set", f"train.max_steps={max_steps}")
        assert again.returncode == 0, again.stderr[-3000:]
        said = flat(again.stderr)
        assert f"nothing to do: the run in {run} is complete at step {STEPS}" in said
        assert "raise train.max_steps" in said
        assert mtimes(run) == before  # no sample re-rendered, no LoRA re-exported, no config.yaml rewritten


def test_resume_at_max_steps_without_its_export_only_exports(copy):
    run = copy.parent / "run"
    (run / "pytorch_lora_weights.safetensors").unlink()  # as if killed after the last checkpoint
    rows = len(read_metrics(run / "metrics.jsonl"))
    result = train(load_config(copy), resume=True)
    assert result.steps == STEPS and result.losses == [] and result.lora_path.is_file()
    assert not any("loss" in r for r in read_metrics(run / "metrics.jsonl")[rows:])  # no step trained again


def test_resume_past_max_steps_without_its_export_is_refused(copy):
    run = copy.parent / "run"
    (run / "pytorch_lora_weights.safetensors").unlink()
    config = load_config(copy, ["train.max_steps=2"])
    with pytest.raises(UserError, match="past train.max_steps 2, and its LoRA was not exported"):
        check_output(config, resume=True)
    with pytest.raises(UserError, match="past train.max_steps 2"):
        train(config, resume=True)


def test_resume_refuses_changed_optimizer_args_by_name(copy):
    config = load_config(copy, ["train.optimizer_args={betas: [0.8, 0.99]}", "train.max_steps=6"])
    with pytest.raises(ConfigError, match=r"train.optimizer_args: \{\} -> \{'betas': \[0.8, 0.99\]\} cannot change"):
        check_output(config, resume=True)
    with pytest.raises(ConfigError, match="cannot change on resume"):
        train(config, resume=True)


def test_the_loop_names_the_fingerprinted_keys_that_differ(copy):
    config = load_config(copy, ["model.lora.rank=8", "train.max_steps=6"])
    with pytest.raises(UserError, match=r"different config; changed: model.lora.rank: 4 -> 8"):
        train(config, resume=True)  # was: "(model, data or batch settings changed)"



def test_a_checkpoint_of_0_4_resumes_under_keys_added_since():
    """The fingerprints 0.4.0 wrote for two configs (computed at that release): keys added later, at their
    defaults, leave them unchanged; using such a key changes it and is named."""
    from qflux.config.schema import QfluxConfig
    from qflux.training.fingerprint import config_fingerprint, differing_keys

    assert config_fingerprint(QfluxConfig()) == "6453918e3bb0bf73"
    qwen = {"trainer": "qwen-edit", "model": {"lora": {"rank": 4, "targets": ["to_q"]}}, "data": {"resolution": [512, 512]}}
    assert config_fingerprint(QfluxConfig.model_validate(qwen)) == "9cf069860435c082"
    dora = QfluxConfig.model_validate({"model": {"lora": {"dora": True}}})
    assert config_fingerprint(dora) != "6453918e3bb0bf73"
    assert differing_keys(QfluxConfig(), dora) == ["model.lora.dora: False -> True"]
