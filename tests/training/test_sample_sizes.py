"""``qflux sample`` plans sizes from the sizes a LoRA was trained with (its metadata), not from whatever config
it is given; ``--width/--height`` override; no image falls back to the trained resolution, not 512x512."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from qflux.adapters.lora_files import attach_lora, export_lora, read_lora_metadata
from qflux.config import load_config
from qflux.config.schema import DataConfig
from qflux.data.trained_sizes import KEY, sizes_metadata, trained_data
from qflux.errors import UserError
from qflux.plugins import build_registry
from qflux.testing import tiny_config, write_config


def lora_file(tmp_path, config, data: DataConfig | None):
    registry = build_registry()
    trainer = registry.trainer(config.trainer)
    transformer = trainer.load_transformer(config.model)
    attach_lora(transformer, config.model.lora)
    extra = sizes_metadata(data) if data is not None else None
    return export_lora(transformer, trainer.info.pipeline, config.model.lora, tmp_path / "lora", extra_metadata=extra)


def sample(config_path, out, *extra):
    from qflux.cli.main import app

    result = CliRunner().invoke(app, ["sample", "--config", str(config_path), "--prompt", "x", "--out", str(out),
                                      "--steps", "1", *map(str, extra)])
    assert result.exit_code == 0, result.output[-2000:]
    return result.output


@pytest.fixture
def setup(tmp_path):
    """A 32-px config (like a demo's) and a 900x500 photo; the LoRA was trained at 128 px budget."""
    config_path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (900, 500), (200, 30, 30)).save(photo)
    trained = DataConfig(resolution=128, control_resolution="target")
    return config_path, photo, lora_file(tmp_path, load_config(config_path), trained)


def test_sizes_come_from_the_loras_metadata(tmp_path, setup):
    config_path, photo, lora = setup
    assert json.loads(read_lora_metadata(lora)[KEY])["resolution"] == 128
    output = sample(config_path, tmp_path / "a.png", "--image", photo, "--lora", lora)
    assert Image.open(tmp_path / "a.png").size == (176, 96)  # 128 x 128 budget at 9:5; the 32-px config: 48x16
    assert "trained with" in output


def test_width_height_override(tmp_path, setup):
    config_path, photo, lora = setup
    output = sample(config_path, tmp_path / "b.png", "--image", photo, "--lora", lora, "--width", 100)
    assert Image.open(tmp_path / "b.png").size == (96, 48)  # 100 -> 96; height keeps 176:96 -> 54.5 -> 48
    assert "--width/--height" in output


def test_no_image_uses_the_trained_resolution_not_512(tmp_path, setup):
    config_path, _, lora = setup
    sample(config_path, tmp_path / "c.png", "--lora", lora)
    assert Image.open(tmp_path / "c.png").size == (128, 128)


def test_lora_without_sizes_plans_from_the_config(tmp_path):
    config_path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    lora = lora_file(tmp_path, load_config(config_path), None)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (900, 500), (200, 30, 30)).save(photo)
    output = sample(config_path, tmp_path / "d.png", "--image", photo, "--lora", lora)
    assert Image.open(tmp_path / "d.png").size == (48, 16) and "config's data section" in output  # 32 px budget


def test_trained_data_round_trip_and_bad_entry():
    data = DataConfig(resolution=[(48, 80), (64, 64)], resize="buckets", control_resolution=256, vl_resolution=384,
                      max_aspect=2.5)
    back = trained_data(DataConfig(), sizes_metadata(data))
    assert (back.resolution, back.resize, back.control_resolution, back.vl_resolution, back.max_aspect) == (
        [(48, 80), (64, 64)], "buckets", 256, 384, 2.5)
    assert trained_data(DataConfig(), {}) is None
    with pytest.raises(UserError, match=KEY):
        trained_data(DataConfig(), {KEY: '{"resolution": 20}'})


def test_trained_lora_records_its_sizes(make_config):
    from qflux.run.train import train

    config = make_config(train={"max_steps": 1, "save_every": 0})
    result = train(config)
    recorded = json.loads(read_lora_metadata(result.lora_path)[KEY])
    assert recorded == {"resolution": 32, "resize": None, "control_resolution": "target", "vl_resolution": None,
                        "max_aspect": 4.0}


def test_validation_plans_like_training(tmp_path):
    """Validation requests: output at the target's planned size, controls and VL copies by the pipeline rule."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from qflux.config.schema import QfluxConfig
    from qflux.training.validation import cases_from_config
    from qflux_qwen.variants import VARIANTS

    Image.new("RGB", (900, 500), (10, 20, 30)).save(tmp_path / "in.png")
    config = QfluxConfig(data={"resolution": 64},
                         validation={"samples": [{"control": [str(tmp_path / "in.png")], "prompt": "x"}, {"prompt": "y"}]})
    with_image, without = cases_from_config(config, [], VARIANTS["qwen-edit-plus"].condition_sizing)
    request = with_image.request
    assert (request.width, request.height) == (80, 48)  # the 64 px budget at 9:5 (cut to the 80x48 frame)
    assert request.controls[0].size == plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, 80 / 48)
    assert request.vl_controls[0].size == plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, 80 / 48)
    assert (without.request.width, without.request.height) == (64, 64)
