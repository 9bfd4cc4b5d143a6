"""qflux_sample: requested size, deterministic per seed, true CFG, text-to-image, fresh scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from qflux.errors import UserError
from qflux.types import ModelBundle, SampleRequest
from qflux_qwen.plugin import TRAINERS


def _bundle(variants, name, transformers_, encoders, model_config):
    return ModelBundle(trainer=TRAINERS[name], model=model_config(), transformer=transformers_[name], encoders=encoders)


def test_sample_size_seed_and_cfg(variants, transformers_, encoders, model_config, image):

    bundle = _bundle(variants, "qwen-edit-plus", transformers_, encoders, model_config)
    controls = [image(32, 32, 1), image(48, 32, 2)]
    scheduler_config = dict(encoders.scheduler_config)
    transformer = bundle.transformer
    transformer.train()
    try:
        request = SampleRequest(prompt="make it red", controls=controls, height=32, width=48, steps=2, seed=3)
        a = bundle.trainer.sample(bundle, request)
        assert transformer.training  # training mode restored after sampling
    finally:
        transformer.eval()
    b = bundle.trainer.sample(bundle, request)
    c = bundle.trainer.sample(bundle, SampleRequest(**{**request.__dict__, "seed": 4}))
    cfg = bundle.trainer.sample(bundle, SampleRequest(**{**request.__dict__, "true_cfg": 4.0, "negative_prompt": "blurry"}))
    assert a.size == cfg.size == (48, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(cfg))
    assert encoders.scheduler_config == scheduler_config


@pytest.mark.parametrize("name", ["qwen-edit", "qwen-edit-2511"])
def test_sample_edit_and_text_to_image(name, variants, transformers_, encoders, model_config, image):

    bundle = _bundle(variants, name, transformers_, encoders, model_config)
    edited = bundle.trainer.sample(bundle, SampleRequest(prompt="x", controls=[image(32, 32, 1)], height=32, width=32, steps=2))
    t2i = bundle.trainer.sample(bundle, SampleRequest(prompt="a red square", height=48, width=32, steps=2))
    assert edited.size == (32, 32) and t2i.size == (32, 48)


def test_sample_loads_missing_encoders_and_checks_controls(variants, transformers_, model_config, image):

    bundle = ModelBundle(trainer=TRAINERS["qwen-edit"], model=model_config(), transformer=transformers_["qwen-edit"])
    with pytest.raises(UserError, match="at most 1"):
        bundle.trainer.sample(bundle, SampleRequest(prompt="x", controls=[image(32, 32, 0)] * 2))
    out = bundle.trainer.sample(bundle, SampleRequest(prompt="x", height=16, width=16, steps=1))
    assert out.size == (16, 16) and bundle.encoders is not None
    assert np.isfinite(np.asarray(out, dtype=np.float32)).all() and np.asarray(out).std() > 0  # 1 step: no NaN
