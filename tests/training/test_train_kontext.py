"""End to end on tiny FLUX.1 Kontext: the CLI run's outputs, the LoRA in diffusers, and exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from qflux.adapters.lora_files import attach_lora, load_lora_state
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import tiny_config, write_config
from qflux.types import ModelBundle, SampleRequest


def test_cli_run_writes_lora_checkpoints_samples_and_logs(tmp_path):
    config = tiny_config(tmp_path, validation={"every": 3, "steps": 2, "from_holdout": 1})
    path = write_config(tmp_path / "c.yaml", config)
    proc = subprocess.run([sys.executable, "-m", "qflux", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("pytorch_lora_weights.safetensors", "metrics.jsonl", "loss.png", "config.yaml",
                 "samples/step-000000.png", "samples/step-000003.png", "samples/step-000006.png",
                 "checkpoints/step-000003/lora.safetensors", "checkpoints/step-000006/manifest.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert "held-out validation loss at step 0" in proc.stderr and "held-out validation loss at step 6" in proc.stderr
    keys = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)


def test_exported_lora_reproduces_trained_model_in_diffusers_pipeline(tmp_path, make_config):
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from qflux_kontext.tiny import save_tiny

    config = make_config(train={"max_steps": 4, "save_every": 0, "lr": 5e-3})
    result = train(config)

    # the trained model, rebuilt the way qflux holds it: base + the LoRA tensors of the run
    registry = build_registry()
    trainer = registry.trainer("kontext")
    transformer = trainer.load_transformer(config.model)
    attach_lora(transformer, config.model.lora)
    exported = load_file(str(result.lora_path))
    load_lora_state(transformer, {k.removeprefix("transformer."): v for k, v in exported.items()})
    encoders = trainer.load_encoders(config.model)
    control = Image.new("RGB", (32, 32), (200, 30, 30))
    request = SampleRequest(prompt="make the red circle blue", controls=[control], height=32, width=32, steps=3,
                            seed=5, guidance=1.0)
    ours = trainer.sample(ModelBundle(trainer, config.model, transformer, encoders), request)

    folder = save_tiny(tmp_path / "tiny")
    pipe = FluxKontextPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    base = pipe(image=control, prompt=request.prompt, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(5), max_sequence_length=32,
                _auto_resize=False, max_area=32 * 32, output_type="np").images[0]
    pipe.load_lora_weights(str(result.lora_path))
    theirs = pipe(image=control, prompt=request.prompt, height=32, width=32, num_inference_steps=3,
                  guidance_scale=1.0, generator=torch.Generator().manual_seed(5), max_sequence_length=32,
                  _auto_resize=False, max_area=32 * 32, output_type="np").images[0]
    import numpy as np

    ours_np = np.asarray(ours, dtype=np.float32) / 255.0
    assert np.abs(ours_np - theirs).max() <= 1.5 / 255  # same image up to the uint8 rounding of ours
    assert np.abs(base - theirs).max() > 2 / 255  # and the LoRA changed it


def test_resume_reproduces_uninterrupted_run_bitwise(tmp_path, make_config):
    config = make_config(train={"max_steps": 6, "save_every": 2, "batch_size": 2, "grad_accum": 2},
                         data={"caption_dropout": 0.3})
    full = train(config)
    reference = load_file(str(full.lora_path))
    run = tmp_path / "run"
    # simulate a run killed after step 2: only its first checkpoint survives
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "checkpoints" / "step-000006")
    (run / "pytorch_lora_weights.safetensors").unlink()
    resumed = train(config, resume=True)
    assert resumed.resumed_from == run / "checkpoints" / "step-000002"
    assert resumed.losses == full.losses[2:]
    again = load_file(str(resumed.lora_path))
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)


def test_new_run_refuses_to_overwrite_checkpoints(tmp_path, make_config):
    import pytest

    from qflux.errors import UserError

    config = make_config(train={"max_steps": 2, "save_every": 1})
    train(config)
    with pytest.raises(UserError, match="--resume"):
        train(config)
    changed = load_config(None, [f"output.dir={tmp_path / 'run'}", "train.seed=3", "train.max_steps=4",
                                 f"cache.dir={tmp_path / 'cache'}", "data.resolution=32", "data.num_samples=8",
                                 "data.holdout=2", "model.dtype=float32", "model.lora.rank=4", "model.lora.alpha=4"])
    with pytest.raises(UserError, match="different config"):
        train(changed, resume=True)
