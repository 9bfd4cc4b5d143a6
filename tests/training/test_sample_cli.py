"""``qflux sample``: inference with a LoRA on a user's image, through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from cli_fork_server import run_qflux_process
from PIL import Image

from qflux.adapters.lora_files import attach_lora, export_lora
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.testing import tiny_config, write_config


def make_lora(tmp_path, config) -> str:
    """A LoRA with non-zero B so that it visibly changes the output."""
    registry = build_registry()
    trainer = registry.trainer("kontext")
    transformer = trainer.load_transformer(config.model)
    attach_lora(transformer, config.model.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return str(export_lora(transformer, trainer.info.pipeline, config.model.lora, tmp_path / "lora"))


def run_sample(config_path, out, *extra):
    return run_qflux_process(["sample", "--config", config_path, "--prompt", "make the red square blue", "--out", out,
                              "--steps", "2", "--seed", "3", *extra], Path.cwd(), dict(os.environ), timeout=300)


def test_sample_with_lora_writes_image_of_control_size(tmp_path):
    config_path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"resolution": 64}))
    lora = make_lora(tmp_path, load_config(config_path))
    control = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (220, 20, 20)).save(control)

    with_lora = run_sample(config_path, tmp_path / "a.png", "--image", str(control), "--lora", lora)
    assert with_lora.returncode == 0, with_lora.stderr[-2000:]
    base = run_sample(config_path, tmp_path / "b.png", "--image", str(control))
    assert base.returncode == 0, base.stderr[-2000:]
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == b.size and a.size[0] > a.size[1]  # keeps the control's landscape aspect
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 0  # the LoRA is applied
    again = run_sample(config_path, tmp_path / "c.png", "--image", str(control), "--lora", lora)
    assert again.returncode == 0
    assert np.array_equal(np.asarray(a), np.asarray(Image.open(tmp_path / "c.png")))  # seeded


def test_sample_missing_image_is_a_user_error(tmp_path):
    config_path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    proc = run_sample(config_path, tmp_path / "x.png", "--image", str(tmp_path / "nope.png"))
    assert proc.returncode == 2 and "nope.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_sample_qwen_edit_with_true_cfg_and_negative_prompt(tmp_path):
    config_path = write_config(tmp_path / "q.yaml", tiny_config(tmp_path, trainer="qwen-edit"))
    control = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (20, 20, 220)).save(control)
    plain = run_sample(config_path, tmp_path / "a.png", "--image", str(control))
    cfg = run_sample(config_path, tmp_path / "b.png", "--image", str(control), "--true-cfg", "3",
                     "--negative-prompt", "blurry")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    a, b = np.asarray(Image.open(tmp_path / "a.png"), dtype=int), np.asarray(Image.open(tmp_path / "b.png"), dtype=int)
    assert a.shape == b.shape == (32, 32, 3)
    assert np.abs(a - b).max() > 0  # true CFG with the negative prompt changes the result
