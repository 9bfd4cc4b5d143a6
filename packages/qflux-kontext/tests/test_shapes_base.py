"""``builtin:shapes-base``: the committed tiny FLUX.1 Kontext pretrained on ``builtin:shapes``
(scripts/build_shapes_base.py) loads through the ordinary folder path and really reproduces its reference."""

from __future__ import annotations

import json

import pytest

from qflux.config.schema import ModelConfig
from qflux.data.shapes import make_example
from qflux.fidelity import psnr, unedited_region
from qflux.model_source import ModelSource, builtin_folder
from qflux.types import ModelBundle, SampleRequest

BASE = "builtin:shapes-base"


@pytest.fixture(scope="module")
def base_model() -> ModelConfig:
    return ModelConfig(pretrained=BASE, dtype="float32", options={"sample_guidance": 1.0})


def test_it_is_a_folder_shipped_in_the_package():
    folder = builtin_folder(BASE)
    source = ModelSource.parse(BASE)
    assert (source.kind, source.path, source.is_tiny) == ("folder", folder, False)
    assert source.resolve() == str(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    weights = sorted(folder.glob("*/*.safetensors"))
    assert len(weights) == 4 and sum(p.stat().st_size for p in weights) < 4_000_000  # a few MB, committed


def test_loads_through_the_trainer_and_reproduces_the_reference(trainer, base_model):
    transformer = trainer.load_transformer(base_model)
    encoders = trainer.load_encoders(base_model)
    assert type(transformer).__name__ == "FluxTransformer2DModel" and not transformer.training
    assert encoders.vae_factor == 4 and encoders.max_sequence_length == 16
    assert trainer.scheduler_config(base_model)["use_dynamic_shifting"] is True
    ex = make_example(9_000_000, 64, 64, "pink")  # a prompt it never saw: it keeps the picture
    image = trainer.sample(ModelBundle(trainer, base_model, transformer, encoders),
                           SampleRequest(prompt=ex.prompt, controls=[ex.control], height=64, width=64, steps=8,
                                         seed=0))
    assert image.size == (64, 64)
    assert psnr(ex.control, image, unedited_region(ex.control, ex.target, ex.mask)) > 22.0
