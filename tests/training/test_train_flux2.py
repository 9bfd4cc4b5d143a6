"""End to end on the tiny FLUX.2 trainers (qflux-flux2: flux2-dev, flux2-klein):

- a user's own FLUX.2 [klein] diffusers folder (``save_pretrained``) with two references per sample trains from
  ``qflux train --trainer flux2-klein --config ...`` in a subprocess, with validation images;
- the exported LoRA loads with the pipeline's ``load_lora_weights`` and reproduces the trained model (transformer
  outputs and the sampled image), differs from the base, and has the same strength under ComfyUI's rule;
- samples with 0, 1 and 2 references share batches (one optimizer step sees them all) and reference dropout
  trains; resume is bitwise with both on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fork_server import run_qflux_process
from PIL import Image
from safetensors.torch import load_file

from qflux.adapters.lora_files import attach_lora, load_lora_state
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import single_torch_thread, write_config
from qflux.types import ModelBundle, SampleRequest

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out"]


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def make_folder(root: Path, references: dict[str, int]) -> Path:
    """The qflux folder layout with ``references[stem]`` reference images per sample (64 px and up)."""
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i, (stem, count) in enumerate(references.items()):
        noise_image(64, 64, i).save(root / "training_images" / f"{stem}.png")
        (root / "training_images" / f"{stem}.txt").write_text(f"put the shape of picture {count} on the left")
        for j in range(count):
            name = f"{stem}.png" if j == 0 else f"{stem}_control_{j}.png"
            noise_image(64 + 16 * j, 64, 100 + 10 * i + j).save(root / "control_images" / name)
    return root


def config_dict(tmp: Path, trainer: str, pretrained: str, folder: Path, **sections) -> dict:
    config = {
        "trainer": trainer,
        "model": {"pretrained": pretrained, "dtype": "float32", "lora": {"rank": 4, "alpha": 8, "targets": TARGETS}},
        "data": {"path": str(folder), "resolution": 64, "holdout": 0, "mixed_controls": True},
        "cache": {"enabled": True, "dir": str(tmp / "cache")},
        "train": {"max_steps": 4, "batch_size": 3, "lr": 5e-3, "save_every": 2, "seed": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def test_klein_folder_with_two_references_trains_from_the_cli_and_loads_in_diffusers(tmp_path):
    import diffusers

    from qflux_flux2.predict import forward
    from qflux_flux2.tiny import save_tiny

    folder = save_tiny(tmp_path / "my-klein", "flux2-klein")
    data = make_folder(tmp_path / "data", {f"s{i}": 2 for i in range(3)})
    config = config_dict(tmp_path, "flux2-klein", str(folder), data,
                         validation={"every": 4, "steps": 2, "samples": [{"prompt": "make it red", "control": [str(data / "control_images" / "s0.png"), str(data / "control_images" / "s0_control_1.png")]}]})
    path = write_config(tmp_path / "klein.yaml", config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_qflux_process(["train", "--trainer", "flux2-klein", "--config", path], Path.cwd(), env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    lora_file = run / "pytorch_lora_weights.safetensors"
    exported = load_file(str(lora_file))
    assert exported and all(k.startswith("transformer.") and ".lora_" in k for k in exported)
    assert any("single_transformer_blocks" in k for k in exported)
    assert list((run / "samples").rglob("*.png"))  # validation images with references were drawn

    # the trained model as qflux holds it: the base + the run's unbaked LoRA tensors (last checkpoint)
    from qflux.config import load_config

    cfg = load_config(path)
    trainer = build_registry().trainer("flux2-klein")
    ours = trainer.load_transformer(cfg.model)
    attach_lora(ours, cfg.model.lora)
    load_lora_state(ours, {k.removeprefix("transformer."): v for k, v in _unbaked(exported, 8 / 4).items()})
    ours.eval()

    pipe = diffusers.Flux2KleinPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 128, generator=g)
    refs = [torch.randn(1, 16, 128, generator=g), torch.randn(1, 20, 128, generator=g)]
    prompt = torch.randn(1, 12, 48, generator=g)
    sigma = torch.tensor([0.6])
    call = dict(latents=latents, sigmas=sigma, prompt=prompt, controls=refs, grid=(4, 4),
                control_grids=[(4, 4), (4, 5)], guidance=None)
    with torch.no_grad():
        base = forward(pipe.transformer, **call)
        pipe.load_lora_weights(str(lora_file))
        theirs = forward(pipe.transformer, **call)
        mine = forward(ours, **call)
    assert (mine - theirs).abs().max() <= 1e-5
    assert (base - theirs).abs().max() > 1e-3

    # the same image from Trainer.sample with the LoRA'd pipeline transformer and with qflux's model
    encoders = trainer.load_encoders(cfg.model)
    request = SampleRequest(prompt="make it red", controls=[noise_image(64, 64, 1), noise_image(80, 64, 2)],
                            height=64, width=64, steps=2, seed=3)
    image_theirs = np.asarray(trainer.sample(ModelBundle(trainer, cfg.model, pipe.transformer, encoders), request),
                              dtype=np.int16)
    image_ours = np.asarray(trainer.sample(ModelBundle(trainer, cfg.model, ours, encoders), request), dtype=np.int16)
    assert np.abs(image_ours - image_theirs).max() <= 1


def _unbaked(exported: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The export bakes alpha / rank into lora_B (issue 13); peft's live module applies it as its scaling."""
    return {k: (v / scale if ".lora_B." in k else v) for k, v in exported.items()}


@pytest.mark.parametrize("trainer_name", ["flux2-dev", "flux2-klein"])
def test_comfyui_rule_gives_the_trained_strength(trainer_name, tmp_path):
    """The weight change ComfyUI computes from the file (``alpha / rank`` from an alpha tensor, else 1.0, times
    ``up @ down``) equals peft's live ``scaling * B @ A`` of the trained model."""
    from test_lora_export import comfyui_deltas, comfyui_flux_lora_prefixes  # tests/training is on sys.path

    data = make_folder(tmp_path / "data", {"a": 1, "b": 0, "c": 2})
    result = train(_config(tmp_path, trainer_name, data, train={"max_steps": 2, "save_every": 0}))
    exported = load_file(str(result.lora_path))
    transformer = build_registry().trainer(trainer_name).load_transformer(_model(trainer_name))
    prefixes = comfyui_flux_lora_prefixes(transformer.config.num_layers, transformer.config.num_single_layers)
    deltas = comfyui_deltas(exported)
    assert deltas and set(deltas) <= prefixes  # every key is one ComfyUI maps for a Flux model
    for key, delta in deltas.items():
        name = key.removeprefix("transformer.")
        live = 2.0 * result.lora[f"{name}.lora_B.weight"].float() @ result.lora[f"{name}.lora_A.weight"].float()
        assert torch.allclose(delta, live, rtol=1e-3, atol=1e-7), key


def _model(trainer_name: str):
    from qflux.config.schema import ModelConfig

    return ModelConfig(pretrained="builtin:tiny", dtype="float32")


def _config(tmp: Path, trainer_name: str, folder: Path, **sections):
    from qflux.config import load_config

    return load_config(write_config(tmp / f"{trainer_name}.yaml",
                                    config_dict(tmp, trainer_name, "builtin:tiny", folder, **sections)))


def test_mixed_reference_counts_share_batches_and_resume_is_bitwise(tmp_path):
    from qflux.testing import spied_registry

    class Spy:  # each predict call is one layout group of a batch: record its reference counts
        calls: list[int] = []

        def predict(self, inner, transformer, batch, noisy, model):
            self.calls.append(len(batch.controls))
            return inner(transformer, batch, noisy, model)

    data = make_folder(tmp_path / "data", {"none": 0, "one": 1, "two": 2, "one_b": 1, "two_b": 2, "none_b": 0})
    config = _config(tmp_path, "flux2-klein", data, data={"reference_dropout": 0.3, "caption_dropout": 0.2},
                     train={"max_steps": 4, "save_every": 2, "batch_size": 3})
    spy = Spy()
    full = train(config, registry=spied_registry(spy, trainer="flux2-klein"))
    assert len(spy.calls) > 4 and len(set(spy.calls)) > 1  # batches of 3 held several reference layouts
    assert len(full.losses) == 4 and all(np.isfinite(full.losses))
    reference = load_file(str(full.lora_path))
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "pytorch_lora_weights.safetensors").unlink()
    resumed = train(config, resume=True)
    assert resumed.losses == full.losses[2:]
    again = load_file(str(resumed.lora_path))
    assert reference.keys() == again.keys() and all(torch.equal(reference[k], again[k]) for k in reference)
