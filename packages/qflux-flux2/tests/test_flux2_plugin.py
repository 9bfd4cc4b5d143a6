"""The plugin as users meet it: registration, its own options, the empirical-mu shift, folders it refuses, and
the CLI (``qflux sample --image A --image B``, ``qflux data check``, bad references answered with exit 2 and one
line before any work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from qflux.errors import UserError
from qflux.plugins import build_registry
from qflux_flux2.plugin import TRAINERS


def run_qflux(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qflux", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_both_trainers_register_through_the_entry_point():
    registry = build_registry()
    for name in ("flux2-dev", "flux2-klein"):
        trainer = registry.trainer(name)
        assert trainer.info.family == "flux2" and trainer.info.max_controls == 10
        assert trainer.info.condition_sizing.shrink_only and trainer.info.condition_sizing.multiple == 16
        for stage in ("load_transformer", "load_encoders", "encode", "predict", "sample"):
            assert trainer.implements(stage)


def test_shift_rule_is_the_pipelines_empirical_mu(model_config):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from qflux_flux2.tiny import SCHEDULER_CONFIG

    rule = TRAINERS["flux2-klein"].shift_rule(model_config(options={"shift_steps": 28}))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for tokens in (256, 1024, 4096, 6000):
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        mu = compute_empirical_mu(tokens, 28)
        assert torch.allclose(rule.apply(sigmas, tokens), scheduler.time_shift(mu, 1.0, sigmas), atol=1e-6)
    assert "empirical mu" in rule.describe()


def test_a_step_distilled_klein_folder_is_refused_unless_allowed(tmp_path, model_config):
    from qflux.config.schema import QfluxConfig

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    config = QfluxConfig(trainer="flux2-klein", model={"pretrained": str(tmp_path)})
    with pytest.raises(UserError, match="step-distilled.*allow_distilled"):
        TRAINERS["flux2-klein"].check(config)
    TRAINERS["flux2-klein"].check(QfluxConfig(trainer="flux2-klein", model={"pretrained": str(tmp_path),
                                                                             "options": {"allow_distilled": True}}))


def test_a_klein_folder_under_the_dev_trainer_is_refused(tmp_path, model_config):
    from qflux_flux2.tiny import save_tiny

    folder = save_tiny(tmp_path / "klein", "flux2-klein")
    with pytest.raises(UserError, match="Qwen3|Mistral3|mistral3|qwen3|guidance"):
        TRAINERS["flux2-dev"].load_encoders(model_config(pretrained=str(folder)))
    with pytest.raises(UserError, match="guidance embedding.*flux2-klein"):
        TRAINERS["flux2-dev"].load_transformer(model_config(pretrained=str(folder)))


def test_references_too_small_or_too_many_are_refused(encoders, model_config, image):
    from qflux.types import EditSample

    with pytest.raises(UserError, match="at least 64 px"):
        TRAINERS["flux2-klein"].encode(encoders["flux2-klein"], [EditSample("s", "x", image(64, 64, 0),
                                                                            [image(48, 64, 1)])], model_config(), False)
    with pytest.raises(UserError, match="at most 10"):
        TRAINERS["flux2-klein"].encode(encoders["flux2-klein"], [EditSample("s", "x", image(64, 64, 0),
                                                                            [image(64, 64, 1)] * 11)], model_config(), False)


def _folder(root: Path, references: list[list[tuple[int, int] | str]]) -> Path:
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i, refs in enumerate(references):
        rng = np.random.RandomState(i)
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(root / "training_images" / f"s{i}.png")
        (root / "training_images" / f"s{i}.txt").write_text("make it red")
        for j, ref in enumerate(refs):
            path = root / "control_images" / (f"s{i}.png" if j == 0 else f"s{i}_control_{j}.png")
            if isinstance(ref, str):
                path.write_bytes(ref.encode())
            else:
                Image.fromarray((rng.rand(ref[1], ref[0], 3) * 255).astype("uint8")).save(path)
    return root


def _config(tmp: Path, folder: Path) -> Path:
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": "flux2-klein",
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "max_sequence_length": 32},
        "data": {"path": str(folder), "resolution": 64, "mixed_controls": True},
        "cache": {"dir": str(tmp / "cache")},
        "train": {"max_steps": 1},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }))
    return path


# (undecodable and empty references are checked by the core for every trainer: tests/test_user_mistakes.py)
@pytest.mark.parametrize("case, expected", [
    ("undecodable", "s1"),
    ("too many", "at most 10"),
    ("missing", "missing.png"),
])
def test_bad_references_are_exit_2_one_line_before_any_work(case, expected, tmp_path):
    refs = {"undecodable": [(64, 64), "not an image"], "empty": [(64, 64), ""], "too many": [(64, 64)] * 11,
            "missing": [(64, 64)]}[case]
    folder = _folder(tmp_path / "data", [[(64, 64)], refs])
    if case == "missing":  # a manifest naming a reference file that is not there
        rows = [{"target": "training_images/s0.png", "control": ["control_images/s0.png"], "prompt": "x"},
                {"target": "training_images/s1.png", "control": ["control_images/s1.png", "missing.png"],
                 "prompt": "x"}]
        (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        folder = folder / "train.jsonl"
    done = run_qflux("train", "--config", str(_config(tmp_path, folder)))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert expected in lines[-1] and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_data_check_and_sample_with_two_references(tmp_path):
    folder = _folder(tmp_path / "data", [[(64, 64), (80, 64)], [(64, 64)], []])
    config = _config(tmp_path, folder)
    checked = run_qflux("data", "check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr[-2000:]
    out = tmp_path / "edit.png"
    sampled = run_qflux("sample", "--config", str(config), "--image", str(folder / "control_images" / "s0.png"),
                        "--image", str(folder / "control_images" / "s0_control_1.png"), "--prompt", "make it red",
                        "--steps", "2", "--out", str(out))
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert Image.open(out).size == (64, 64)
