"""A trainer's own keys (``model.options``, validated by its ``Trainer.Options``): the Kontext trainer's guidance
keys, the migration of their old places (``model.guidance``, ``validation.guidance``) and the errors."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config import load_config
from qflux.config.load import validate
from qflux.errors import ConfigDeprecation, ConfigError
from qflux.plugins import build_registry
from qflux.run.preflight import check_plugins
from qflux.testing import tiny_config, write_config


def _config(tmp_path, trainer="kontext", **sections):
    return validate(tiny_config(tmp_path, trainer, **sections), "c.yaml")


def test_old_guidance_keys_move_into_the_trainer_options_with_a_warning(tmp_path):
    raw = tiny_config(tmp_path, "kontext", model={"pretrained": "builtin:tiny", "guidance": 3.0},
                      validation={"every": 0, "guidance": 4.0})
    with pytest.warns(ConfigDeprecation) as caught:
        config = validate(raw, "c.yaml")
    assert config.model.options == {"guidance": 3.0, "sample_guidance": 4.0}
    messages = [str(w.message) for w in caught]
    assert any("model.guidance is now the trainer's option model.options.guidance" in m for m in messages)
    assert any("validation.guidance" in m and "model.options.sample_guidance" in m for m in messages)
    # the old defaults say nothing new: dropped (a Qwen config that kept them stays valid)
    with pytest.warns(ConfigDeprecation):
        quiet = validate(tiny_config(tmp_path, "qwen-edit", model={"guidance": 1.0},
                                     validation={"every": 0, "guidance": 2.5}), "c.yaml")
    assert quiet.model.options == {}
    check_plugins(quiet, build_registry())


def test_the_cli_prints_a_moved_key_as_one_warning_line(tmp_path, run_qflux):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "kontext", model={"guidance": 2.0}))
    result = run_qflux("config", "check", path, plugins=None)
    assert result.returncode == 0, result.stderr
    assert "warning: " in result.stderr and "model.options.guidance" in result.stderr
    assert "FutureWarning" not in result.stderr and "Traceback" not in result.stderr


def test_a_misspelt_option_is_an_error_with_did_you_mean(tmp_path):
    registry = build_registry()
    with pytest.raises(ConfigError, match=r"unknown key 'model.options.guidence' \(did you mean "
                                          r"'model.options.guidance'\? the kontext trainer takes: guidance, "
                                          r"sample_guidance\)"):
        check_plugins(_config(tmp_path, model={"options": {"guidence": 2.0}}), registry)
    with pytest.raises(ConfigError, match=r"'model.options.guidance': Input should be a valid number"):
        check_plugins(_config(tmp_path, model={"options": {"guidance": "high"}}), registry)
    with pytest.raises(ConfigError, match=r"model.options: the qwen-edit trainer takes no options \(got guidance\)"):
        check_plugins(_config(tmp_path, "qwen-edit", model={"options": {"guidance": 2.0}}), registry)


def test_kontext_trains_and_samples_with_its_option_values(tmp_path):
    """The guidance embedding of a step is model.options.guidance; a sample without an explicit guidance uses
    model.options.sample_guidance (and equals the one given that value explicitly)."""
    from qflux.run.models import Selection, inference_bundle
    from qflux.types import Batch, NoisyInput, PromptEmbeds, SampleRequest

    registry = build_registry()
    trainer = registry.trainer("kontext")
    config = _config(tmp_path)
    transformer = trainer.load_transformer(config.model)
    torch.manual_seed(0)
    batch = Batch(keys=["a"], latents=torch.randn(1, 4, 64), grid=(2, 2),
                  prompt=PromptEmbeds(hidden=torch.randn(1, 8, 64), pooled=torch.randn(1, 32)))
    noisy = NoisyInput(latents=torch.randn(1, 4, 64), sigmas=torch.full((1,), 0.5), target=torch.zeros(1, 4, 64))
    with torch.no_grad():
        default = trainer.predict(transformer, batch, noisy, config.model)
        same = trainer.predict(transformer, batch, noisy, config.model.model_copy(update={"options": {"guidance": 1.0}}))
        other = trainer.predict(transformer, batch, noisy, config.model.model_copy(update={"options": {"guidance": 4.0}}))
    assert torch.equal(default, same) and not torch.allclose(default, other)

    chosen = config.model_copy(update={"model": config.model.model_copy(update={"options": {"sample_guidance": 6.0}})})
    bundle = inference_bundle(Selection.of(chosen, registry), chosen, None)
    request = SampleRequest(prompt="make it red", controls=[Image.new("RGB", (32, 32), (20, 200, 30))], height=32,
                            width=32, steps=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        implicit = trainer.sample(bundle, request)
        explicit = trainer.sample(bundle, replace(request, guidance=6.0))
        pipeline_default = trainer.sample(bundle, replace(request, guidance=2.5))
    assert np.array_equal(np.asarray(implicit), np.asarray(explicit))
    assert not np.array_equal(np.asarray(implicit), np.asarray(pipeline_default))


def test_configs_in_the_repo_use_the_new_keys():
    """No shipped config relies on the migration."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "configs").glob("*.yaml")):
        if "accelerate" in path.parts:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigDeprecation)
            load_config(path)
