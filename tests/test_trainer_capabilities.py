"""A trainer plugin implements only the stages its model supports; the core finds a missing one before any work
and says so in one line, exit code 2 (issue 15: ``Trainer.require`` / ``run.preflight.check_capabilities``).

The trainers come from a fake installed distribution found through the real ``qflux`` entry points, and every
command is the real CLI in a subprocess:

- ``toy-nosample``: tests/fixtures/toy_plugin.py's ToyTrainer without ``sample`` (a model qflux can train but
  not render: no validation images, no ``qflux sample``);
- ``toy-nopredict``: without ``predict`` (it can encode, e.g. for ``qflux cache``, but not train).

Both log every stage they run to the file named by ``QFLUX_TEST_TRACE``, so a test sees what ran before the
refusal. The transformer is the toy's Linear under the name ``proj``, adapted by tests/fixtures/
toy_adapter_plugin.py's ``toy-scale`` (installed from the same distribution: trainer and adapter plugins compose).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from qflux.testing import tiny_config, write_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PLUGINS = "partial,toyadapter"

PARTIAL_SRC = '''
"""Toy trainers that lack a stage each (see tests/test_trainer_capabilities.py)."""

import dataclasses
import os

import qflux
from qflux.plugin_api import Trainer
from qflux_toy_base import TOY_INFO, ToyTrainer


def trace(stage):
    path = os.environ.get("QFLUX_TEST_TRACE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(stage + "\\n")


class Traced(ToyTrainer):
    """ToyTrainer, each stage logged; the transformer is its Linear as the child ``proj``."""

    def load_transformer(self, model):
        import torch

        trace("load_transformer")

        class ToyNet(torch.nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

            def forward(self, x):
                return self.proj(x)

        return ToyNet(super().load_transformer(model))

    def load_encoders(self, model):
        trace("load_encoders")
        return super().load_encoders(model)

    def encode(self, encoders, samples, model, empty_prompt):
        trace("encode")
        return super().encode(encoders, samples, model, empty_prompt)

    def predict(self, transformer, batch, noisy, model):
        trace("predict")
        return super().predict(transformer, batch, noisy, model)

    def sample(self, bundle, request):
        trace("sample")
        return super().sample(bundle, request)


class NoSample(Traced):
    info = dataclasses.replace(TOY_INFO, name="toy-nosample")
    sample = Trainer.sample  # not implemented: the base class's


class NoPredict(Traced):
    info = dataclasses.replace(TOY_INFO, name="toy-nopredict")
    predict = Trainer.predict  # not implemented: the base class's


@qflux.hookimpl
def qflux_register_trainers(register):
    register(NoSample())
    register(NoPredict())
'''


@pytest.fixture
def site(fake_dist, tmp_path: Path) -> Path:
    """``qflux-toy-partial`` 0.1.0: entry points ``partial`` (the trainers) and ``toyadapter`` (toy-scale)."""
    return fake_dist(tmp_path / "site", "qflux-toy-partial", "0.1.0",
                     {"partial": "qflux_toy_partial", "toyadapter": "qflux_toy_scale"},
                     {"qflux_toy_partial.py": PARTIAL_SRC,
                      "qflux_toy_base.py": (FIXTURES / "toy_plugin.py").read_text(),
                      "qflux_toy_scale.py": (FIXTURES / "toy_adapter_plugin.py").read_text()})


@pytest.fixture
def qflux(run_qflux, site: Path, tmp_path: Path):
    """Run the CLI with the partial trainers installed; ``trace()`` lists the stages they ran."""
    trace_file = tmp_path / "trace.txt"

    def run(*args: str):
        return run_qflux(*args, plugins=PLUGINS, pythonpath=[site], env={"QFLUX_TEST_TRACE": str(trace_file)})

    run.trace = lambda: trace_file.read_text().split() if trace_file.exists() else []
    return run


def config_file(tmp_path: Path, trainer: str, **sections) -> Path:
    train = {"max_steps": 4, "save_every": 2, **sections.pop("train", {})}
    config = tiny_config(tmp_path, trainer, train=train, **sections)
    config["model"] = {"pretrained": "builtin:tiny", "dtype": "float32", "adapter": "toy-scale",
                       "adapter_options": {"targets": ["proj"]}}
    return write_config(tmp_path / f"{trainer}.yaml", config)


def refusal(result) -> str:
    """The one ``error:`` line of an exit-2 refusal."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "run").exists()  # output.dir
    assert not (tmp_path / "cache").exists()  # cache.dir


def test_train_with_validation_samples_needs_the_sample_stage(qflux, tmp_path):
    path = config_file(tmp_path, "toy-nosample", validation={"every": 2, "from_holdout": 1, "steps": 2})
    err = refusal(qflux("train", "--config", path))
    assert "trainer 'toy-nosample' cannot generate images" in err and "Trainer.sample" in err
    assert "validation sampling" in err and "validation.every: 0" in err  # what needs it, and the way out
    assert_nothing_written(tmp_path)
    assert qflux.trace() == []  # refused before any stage ran


def test_train_without_validation_samples_trains_without_the_sample_stage(qflux, tmp_path):
    path = config_file(tmp_path, "toy-nosample", validation={"every": 0})
    result = qflux("train", "--config", path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    exported = load_file(str(run / "toy_scale_adapter.safetensors"))
    assert set(exported) == {"proj.toy_scale", "proj.toy_shift"}
    assert (run / "checkpoints" / "step-000004" / "lora.safetensors").is_file()
    stages = qflux.trace()
    assert {"load_encoders", "encode", "load_transformer", "predict"} <= set(stages) and "sample" not in stages
    assert stages.index("encode") < stages.index("load_transformer") < stages.index("predict")


def test_validation_loss_alone_needs_no_sample_stage(qflux, tmp_path):
    """validation.every with neither samples nor from_holdout is the held-out loss only: predict, no images."""
    path = config_file(tmp_path, "toy-nosample", validation={"every": 2}, train={"max_steps": 2})
    result = qflux("train", "--config", path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out validation loss at step 2" in result.stderr
    assert "predict" in qflux.trace() and "sample" not in qflux.trace()


def test_sample_needs_the_sample_stage(qflux, tmp_path):
    from PIL import Image

    path = config_file(tmp_path, "toy-nosample")
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    out = tmp_path / "out" / "edit.png"
    err = refusal(qflux("sample", "--config", path, "--image", image, "--prompt", "make it blue", "--out", out))
    assert "trainer 'toy-nosample' cannot generate images" in err and "Trainer.sample" in err
    assert "qflux sample" in err
    assert not out.exists() and not out.parent.exists()
    assert qflux.trace() == []  # no model was loaded to find out


def test_train_without_predict_is_refused_before_any_encoding(qflux, tmp_path):
    path = config_file(tmp_path, "toy-nopredict", validation={"every": 0})
    err = refusal(qflux("train", "--config", path))
    assert "trainer 'toy-nopredict' cannot run a training step" in err and "Trainer.predict" in err
    assert "qflux train" in err
    assert_nothing_written(tmp_path)
    assert qflux.trace() == []  # no encoder loaded, nothing encoded


def test_the_capabilities_are_per_stage(site, monkeypatch):
    """In-process, through the same entry points: each trainer lacks exactly its one stage."""
    import sys

    from qflux.plugins import build_registry

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("QFLUX_LOAD_PLUGINS", PLUGINS)
    try:
        registry = build_registry()
        assert registry.broken == [] and {"toy-nosample", "toy-nopredict"} <= set(registry.trainers)
        stages = ("load_transformer", "load_encoders", "encode", "predict", "sample")
        lacks = {name: [s for s in stages if not registry.trainer(name).implements(s)]
                 for name in ("toy-nosample", "toy-nopredict")}
        assert lacks == {"toy-nosample": ["sample"], "toy-nopredict": ["predict"]}
        assert registry.provider["trainer:toy-nosample"] == "qflux-toy-partial"
    finally:
        for module in ("qflux_toy_partial", "qflux_toy_base", "qflux_toy_scale"):
            sys.modules.pop(module, None)
