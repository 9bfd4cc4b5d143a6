"""End to end on the tiny ``qwen-image-2.1`` trainer (qflux-qwen):

- a user's own Qwen-Image 2.1 diffusers folder (``save_pretrained``) with 0, 1 and 2 condition images per sample trains
  from ``qflux train --trainer qwen-image-2.1`` in a subprocess, with reference dropout and validation images;
- the exported LoRA loads with ``QwenImage21Pipeline.load_lora_weights``, reproduces the trained model, differs from
  the base, and its weight change by ComfyUI's rule equals the trained one;
- resume is bitwise; too many condition images and an undecodable one are exit 2 in one line before any work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fork_server import run_qflux_process
from PIL import Image
from safetensors.torch import load_file

from qflux.adapters.lora_files import attach_lora, load_lora_state
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import single_torch_thread, write_config

NAME = "qwen-image-2.1"


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def make_folder(root: Path, counts: list[int | str]) -> Path:
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i, count in enumerate(counts):
        noise(64, 64, i).save(root / "training_images" / f"s{i}.png")
        (root / "training_images" / f"s{i}.txt").write_text("move the shape of the first picture left")
        if count == "bad":
            (root / "control_images" / f"s{i}.png").write_bytes(b"not an image")
            continue
        for j in range(int(count)):
            name = f"s{i}.png" if j == 0 else f"s{i}_control_{j}.png"
            noise(64 + 32 * (j % 2), 64, 100 + 10 * i + j).save(root / "control_images" / name)
    return root


def config_dict(tmp: Path, pretrained: str, folder: Path, **sections) -> dict:
    config = {
        "trainer": NAME,
        "model": {"pretrained": pretrained, "dtype": "float32", "lora": {"rank": 4, "alpha": 8}},
        "data": {"path": str(folder), "resolution": 64, "control_resolution": 64, "holdout": 0,
                 "mixed_controls": True},
        "cache": {"enabled": True, "dir": str(tmp / "cache")},
        "train": {"max_steps": 4, "batch_size": 3, "lr": 5e-3, "save_every": 2, "seed": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def run_qflux(*args: str) -> subprocess.CompletedProcess:
    return run_qflux_process(list(args), Path.cwd(), {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_user_folder_trains_from_the_cli_and_the_lora_loads_in_diffusers(tmp_path):
    from diffusers import QwenImage21Pipeline

    from qflux_qwen.image21.predict import forward
    from qflux_qwen.image21.tiny import save_tiny

    folder = save_tiny(tmp_path / "my-qwen-image-2.1")
    data = make_folder(tmp_path / "data", [0, 1, 2, 1, 2, 0])
    config = config_dict(tmp_path, str(folder), data, data={"reference_dropout": 0.3},
                         validation={"every": 4, "steps": 2, "samples": [{
                             "prompt": "make it red", "control": [str(data / "control_images" / "s2.png")]}]})
    path = write_config(tmp_path / "q.yaml", config)
    done = run_qflux("train", "--trainer", NAME, "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    lora_file = run / "pytorch_lora_weights.safetensors"
    exported = load_file(str(lora_file))
    assert exported and all(k.startswith("transformer.") and ".lora_" in k for k in exported)
    assert list((run / "samples").rglob("*.png"))

    cfg = load_config(path)
    trainer = build_registry().trainer(NAME)
    ours = trainer.load_transformer(cfg.model)
    attach_lora(ours, cfg.model.lora)
    scale = 8 / 4  # the export bakes alpha / rank into lora_B; peft's live module applies it as its scaling
    load_lora_state(ours, {k.removeprefix("transformer."): (v / scale if ".lora_B." in k else v)
                           for k, v in exported.items()})
    ours.eval()
    pipe = QwenImage21Pipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    slots = torch.zeros(1, 12, dtype=torch.bool)
    slots[0, 2:6] = True  # one 64 x 64 condition: 4 slots of 32 px
    call = dict(latents=torch.randn(1, 16, 64, generator=g), sigmas=torch.tensor([0.6]),
                prompt=torch.randn(1, 12, 32, generator=g), mask=None, slots=slots,
                controls=[torch.randn(1, 16, 64, generator=g)], grid=(4, 4), control_grids=[(4, 4)])
    with torch.no_grad():
        base = forward(pipe.transformer, **call)
        pipe.load_lora_weights(str(lora_file))
        theirs = forward(pipe.transformer, **call)
        mine = forward(ours, **call)
    assert (mine - theirs).abs().max() <= 1e-5
    assert (base - theirs).abs().max() > 1e-4

    # ComfyUI's rule: alpha / rank from an alpha tensor (none here: 1.0) times up @ down, from the file alone
    for key in [k for k in exported if k.endswith(".lora_B.weight")]:
        x = key.removesuffix(".lora_B.weight")
        delta = exported[key].float() @ exported[f"{x}.lora_A.weight"].float()
        module = dict(ours.named_modules())[x.removeprefix("transformer.")]
        live = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        assert torch.allclose(delta, live.detach(), rtol=1e-4, atol=1e-7), key


def test_resume_is_bitwise(tmp_path):
    data = make_folder(tmp_path / "data", [0, 1, 2, 1, 2, 1])
    config = load_config(write_config(tmp_path / "q.yaml", config_dict(tmp_path, "builtin:tiny", data,
                                                                       data={"reference_dropout": 0.3})))
    full = train(config)
    reference = load_file(str(full.lora_path))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    (tmp_path / "run" / "pytorch_lora_weights.safetensors").unlink()
    resumed = train(config, resume=True)
    assert resumed.losses == full.losses[2:]
    again = load_file(str(resumed.lora_path))
    assert all(torch.equal(reference[k], again[k]) for k in reference)


@pytest.mark.parametrize("counts, expected", [([1, 5], "at most 4"), ([1, "bad"], "s1")])
def test_bad_conditions_are_exit_2_one_line_before_any_work(counts, expected, tmp_path):
    data = make_folder(tmp_path / "data", counts)
    path = write_config(tmp_path / "q.yaml", config_dict(tmp_path, "builtin:tiny", data))
    done = run_qflux("train", "--config", str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert expected in lines[-1] and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_quantized_base_with_gradient_checkpointing_trains(tmp_path):
    pytest.importorskip("qflux_quant")
    data = make_folder(tmp_path / "data", [1, 2, 0, 1])
    config = load_config(write_config(tmp_path / "q.yaml", config_dict(
        tmp_path, "builtin:tiny", data, model={"quantize": "nf4", "gradient_checkpointing": True},
        train={"max_steps": 2, "save_every": 0, "batch_size": 2})))
    result = train(config)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert all(torch.isfinite(v).all() for v in load_file(str(result.lora_path)).values())
