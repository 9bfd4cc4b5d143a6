"""Every LoRA qflux writes loads at the strength it was trained with, and nothing loads half (issue 14 item 1).

Before: ``load_lora_file`` loaded with ``prefix="transformer"``, so a checkpoint's LoRA (unprefixed keys, no
adapter metadata) lost every key and ``qflux sample --lora .../checkpoints/step-N/lora.safetensors`` wrote the
base model's image with exit 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_fork_server import run_qflux_process
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lora_export import live_deltas as deltas  # tests/training is on sys.path (rootdir-less test folders)
from test_lora_export import load_transformer, with_random_lora

from qflux.adapters.lora_files import (
    checkpoint_lora_metadata,
    export_lora,
    load_lora_file,
    lora_state_dict,
    read_lora_metadata,
)
from qflux.config.schema import LoraConfig
from qflux.errors import UserError
from qflux.plugins import build_registry
from qflux.testing import single_torch_thread, tiny_config, write_config
from qflux.training import checkpoint as ckpt


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


def assert_same_deltas(loaded: torch.nn.Module, trained: torch.nn.Module) -> None:
    ours, theirs = deltas(loaded), deltas(trained)
    assert ours.keys() == theirs.keys()
    worst = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    assert worst <= 1e-5, worst


def write_checkpoint(run, transformer, lora: LoraConfig | None):
    """``run/checkpoints/step-000002/`` as the training loop writes it (``lora``: its header alpha; None: a
    checkpoint of a qflux version that recorded none)."""
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    position = ckpt.TrainingPosition(step=2, epoch=0, batch_in_epoch=2, config_fingerprint="f")
    metadata = checkpoint_lora_metadata(lora) if lora is not None else None
    return ckpt.save_checkpoint(run, position, lora_state_dict(transformer), optimizer, scheduler, keep=3,
                                lora_metadata=metadata) / ckpt.LORA


LORA = LoraConfig(rank=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])


def test_final_and_checkpoint_loras_load_at_the_trained_strength(tmp_path):
    trained = with_random_lora("kontext", LORA, seed=1)
    final = export_lora(trained, build_registry().trainer("kontext").info.pipeline, LORA, tmp_path / "run")
    checkpoint = write_checkpoint(tmp_path / "run", trained, LORA)
    assert not any(k.startswith("transformer.") for k in load_file(str(checkpoint)))  # unbaked, as training holds it
    for path in (final, checkpoint):
        loaded = load_transformer()
        load_lora_file(loaded, path)
        assert_same_deltas(loaded, trained)  # top-level proj_out too, not the single blocks' proj_out


def test_checkpoint_without_alpha_takes_it_from_its_runs_config(tmp_path):
    trained = with_random_lora("kontext", LORA, seed=1)
    checkpoint = write_checkpoint(tmp_path / "run", trained, None)
    loaded = load_transformer()
    with pytest.raises(UserError, match="records no alpha"):  # no header entry, no config.yaml: refused, not 1.0
        load_lora_file(loaded, checkpoint)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": {"lora": LORA.model_dump(mode="json")}}))
    loaded = load_transformer()
    load_lora_file(loaded, checkpoint)
    assert_same_deltas(loaded, trained)


def test_kohya_alpha_tensors_and_plain_diffusers_files_follow_comfyuis_rule(tmp_path):
    trained = with_random_lora("kontext", LORA, seed=1)
    state = lora_state_dict(trained)
    kohya = {}
    for key, value in state.items():  # lora_down / lora_up names and an alpha tensor: scale alpha / rank
        module, part = key.split(".lora_")
        kohya[f"transformer.{module}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"transformer.{module}.alpha"] = torch.tensor(LORA.alpha)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    loaded = load_transformer()
    load_lora_file(loaded, tmp_path / "kohya.safetensors")
    assert_same_deltas(loaded, trained)

    plain = {f"transformer.{k}": v for k, v in state.items()}  # no alpha anywhere: 1.0, as diffusers and ComfyUI
    save_file(plain, str(tmp_path / "plain.safetensors"))
    loaded = load_transformer()
    load_lora_file(loaded, tmp_path / "plain.safetensors")
    unscaled = deltas(loaded)
    for name, delta in deltas(trained).items():
        assert torch.allclose(unscaled[name] * LORA.alpha / LORA.rank, delta, atol=1e-6)


def _refused_files(state: dict[str, torch.Tensor]) -> dict[str, tuple[dict, str]]:
    a, b = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    return {
        "text-encoder": ({**state, "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 32),
                          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(64, 4)},
                         "target modules do not exist (e.g. text_encoder.text_model"),
        "full-weight": ({**state, "transformer.x_embedder.weight": torch.zeros(128, 64)}, "not a LoRA factor"),
        "dora": ({**state, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(128)},
                 "a DoRA magnitude, but"),  # on one module of several: a whole DoRA (model.lora.dora) loads
        "half-pair": ({k: v for k, v in state.items() if k != b}, "partner is missing"),
        "rank-mismatch": ({**state, a: torch.zeros(3, 128)}, "differs from lora_A's 3"),
        "unprefixed-text-encoder": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
                                     "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
                                    "target modules do not exist"),
        "no-lora": ({"something": torch.zeros(2)}, "holds no LoRA tensors"),
    }


@pytest.mark.parametrize("case", list(_refused_files({})))
def test_a_file_whose_tensors_do_not_all_land_is_refused(case, tmp_path):
    state = {f"transformer.{k}": v for k, v in lora_state_dict(with_random_lora("kontext", LORA, seed=1)).items()}
    tensors, message = _refused_files(state)[case]
    save_file(tensors, str(tmp_path / "x.safetensors"))
    transformer = load_transformer()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        load_lora_file(transformer, tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)
    assert not any(hasattr(m, "lora_A") for m in transformer.modules())  # nothing was loaded


# --------------------------------------------------------------------------- the real command


def run_sample(config_path, out, *extra):
    return run_qflux_process(["sample", "--config", config_path, "--prompt", "make the red square blue", "--out", out,
                              "--steps", "2", "--seed", "3", *extra], Path.cwd(), dict(os.environ), timeout=300)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_qflux_sample_applies_a_checkpoint_lora_like_the_final_one(tmp_path):
    from qflux.config import load_config
    from qflux.run.train import train

    # alpha != rank: a checkpoint loaded at scale 1.0 (or the final export scaled twice) would give another image
    config_path = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, model={"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 4, "alpha": 8}},
        data={"num_samples": 4, "holdout": 0}, train={"max_steps": 2, "save_every": 2, "lr": 2e-2}))
    result = train(load_config(config_path))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002" / "lora.safetensors"
    assert checkpoint.is_file() and result.lora_path.is_file()
    control = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (220, 20, 20)).save(control)

    # sampled with another data.resolution than trained: both LoRAs must plan from the sizes they record
    other = ["--set", "data.resolution=64"]
    runs = {name: run_sample(config_path, tmp_path / f"{name}.png", "--image", str(control), *args)
            for name, args in {"base": [], "checkpoint": ["--lora", str(checkpoint), *other],
                               "final": ["--lora", str(result.lora_path), *other]}.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    base, step, final = (pixels(tmp_path / f"{n}.png") for n in ("base", "checkpoint", "final"))
    assert base.shape == step.shape == final.shape == (32, 32, 3)
    assert np.abs(step - base).max() > 2  # the checkpoint's LoRA is applied (before: identical bytes)
    assert np.abs(step - final).max() <= 1  # at the strength of the final export (uint8 rounding)

    header = json.loads(read_lora_metadata(checkpoint)["lora_adapter_metadata"])
    assert header["r"] == 4 and header["lora_alpha"] == 8
    sizes = "qflux.training_sizes"
    assert read_lora_metadata(checkpoint)[sizes] == read_lora_metadata(result.lora_path)[sizes]

    bad = tmp_path / "half.safetensors"
    save_file({k: v for k, v in load_file(str(result.lora_path)).items() if "lora_B" not in k}, str(bad))
    refused = run_sample(config_path, tmp_path / "bad.png", "--image", str(control), "--lora", str(bad))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "would not land" in refused.stderr, refused.stderr
    assert not (tmp_path / "bad.png").exists()
