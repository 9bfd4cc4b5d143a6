"""``train.optimizer`` by name: ``prodigy``, ``adamw_schedulefree`` and ``adafactor`` each train a tiny Kontext
run, checkpoint and resume bitwise (with a validation mid-run: schedule-free switches to its evaluation weights
and back there); schedule-free's export and validation are of its evaluation weights ``x``, its checkpoints of
its training weights ``y``; a missing extra is a ``ConfigError`` naming the pip command (the CLI's exit 2 before
any work: tests/test_user_mistakes.py, ``optimizer-extra-missing``)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from pydoc import locate as pydoc_locate
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import qflux
from qflux.adapters.lora_files import baked_lora_state_dict
from qflux.config import load_config
from qflux.config.schema import TrainConfig
from qflux.errors import ConfigError
from qflux.plugins import build_registry
from qflux.run.train import TrainResult, train
from qflux.testing import single_torch_thread, tiny_config, write_config
from qflux.training import optim

PIP = "pip install 'qflux-core[optim]'"
PIP_RE = re.escape(PIP)
OPTIMIZERS = {  # name -> (the class it builds, a param-group entry only that optimizer keeps)
    "prodigy": ("prodigyopt.prodigy.Prodigy", "d_max"),
    "adamw_schedulefree": ("schedulefree.adamw_schedulefree.AdamWScheduleFree", "train_mode"),
    "adafactor": ("torch.optim.Adafactor", "beta2_decay"),
}


class Spy:
    """The adapter's parameters, and the weights the held-out losses ran on (by step)."""

    def __init__(self) -> None:
        self.start: Any = None
        self.step = 0
        self.evaluated: dict[int, list[torch.Tensor]] = {}

    @qflux.hookimpl
    def qflux_on_start(self, event):
        self.start, self.step = event, event.step

    @qflux.hookimpl
    def qflux_on_step(self, event):
        self.step = event.step

    @qflux.hookimpl
    def qflux_loss(self, prediction, noisy, batch, loss):
        if not torch.is_grad_enabled():
            self.evaluated.setdefault(self.step, [p.detach().clone() for p in self.start.params])


@dataclass
class Runs:
    name: str
    full: TrainResult
    resumed: TrainResult
    spy: Spy
    full_dir: Path
    resumed_dir: Path


def spied_train(config, resume: bool = False) -> tuple[TrainResult, Spy]:
    spy = Spy()
    with single_torch_thread():
        return train(config, registry=build_registry(extra_plugins=[("spy", spy)]), resume=resume), spy


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def runs(request, tmp_path_factory) -> Runs:
    """4 steps, checkpoints at 2 and 4, validation (held-out loss) at 0, 2 and 4; then a copy of the run folder
    as it was after step 2's checkpoint, resumed to step 4 with validation at every step."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    config = load_config(write_config(tmp / "c.yaml", tiny_config(
        tmp, train={"max_steps": 4, "save_every": 2, "optimizer": name, **({"lr": 1.0} if name == "prodigy" else {})},
        validation={"every": 2}, cache={"enabled": True, "dir": str(tmp_path_factory.getbasetemp() / "tiny-kontext-cache")})))
    full, spy = spied_train(config)
    copy = tmp / "copy"
    shutil.copytree(tmp / "run", copy)
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    (copy / "pytorch_lora_weights.safetensors").unlink()
    # validating at every step from there on must not change the training: the weights an evaluation switches
    # to (schedule-free's x) and back are restored bit for bit
    config = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(copy)}),
                                       "validation": config.validation.model_copy(update={"every": 1})})
    resumed, _ = spied_train(config, resume=True)
    return Runs(name, full, resumed, spy, tmp / "run", copy)


def test_each_optimizer_trains_checkpoints_and_resumes_bitwise(runs):
    cls, entry = OPTIMIZERS[runs.name]
    state = torch.load(runs.full_dir / "checkpoints/step-000004/training_state.pt", weights_only=True)["optimizer"]
    assert entry in state["param_groups"][0] and len(state["state"]) == len(runs.spy.start.params)
    built = optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer=runs.name))
    assert type(built) is pydoc_locate(cls)
    assert len(runs.full.losses) == 4 and all(torch.isfinite(torch.tensor(runs.full.losses)))
    initial = runs.spy.evaluated[0]
    assert any(not torch.equal(a, b) for a, b in zip(initial, runs.spy.start.params))  # it trained
    assert runs.resumed.resumed_from == runs.resumed_dir / "checkpoints" / "step-000002"
    assert runs.resumed.losses == runs.full.losses[2:]
    for name in ("pytorch_lora_weights.safetensors", "checkpoints/step-000004/lora.safetensors"):
        want, got = load_file(str(runs.full_dir / name)), load_file(str(runs.resumed_dir / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    got = torch.load(runs.resumed_dir / "checkpoints/step-000004/training_state.pt", weights_only=True)["optimizer"]
    assert got["param_groups"] == state["param_groups"]
    assert all(torch.equal(state["state"][i][k], got["state"][i][k]) for i in state["state"] for k in state["state"][i]
               if isinstance(state["state"][i][k], torch.Tensor))


@pytest.mark.parametrize("runs", ["adamw_schedulefree"], indirect=True)
def test_schedulefree_validates_and_exports_its_evaluation_weights(runs):
    """x = (y - (1 - beta1) z) / beta1 from the checkpoint's y (the training weights, what the model holds after
    the run) and the optimizer's z: the export and the last held-out loss are of x, not of y."""
    spy, params = runs.spy, runs.spy.start.params
    state = torch.load(runs.full_dir / "checkpoints/step-000004/training_state.pt", weights_only=True)["optimizer"]
    group = state["param_groups"][0]
    assert group["train_mode"] is True  # saved in train mode, with y: a resume continues exactly
    beta1 = group["betas"][0]
    y = [p.detach().clone() for p in params]
    x = [(yi.double() - (1 - beta1) * state["state"][i]["z"].double()) / beta1 for i, yi in enumerate(y)]
    transformer = spy.start.transformer

    def exported_as(weights):
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        return {f"transformer.{k}": v.clone() for k, v in baked_lora_state_dict(transformer).items()}

    want, trained = exported_as(x), exported_as(y)
    checkpoint = load_file(str(runs.full_dir / "checkpoints/step-000004/lora.safetensors"))
    assert all(torch.equal(checkpoint[k], v) for k, v in runs.full.lora.items())  # the checkpoint holds y
    written = load_file(str(runs.full.lora_path))

    def close(a, b):
        return all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-7) for k in b)

    assert written.keys() == want.keys() and close(written, want) and not close(written, trained)
    evaluated = spy.evaluated[4]
    assert all(torch.allclose(e.double(), xi, rtol=0, atol=1e-7) for e, xi in zip(evaluated, x))
    assert not all(torch.allclose(e, yi, rtol=0, atol=1e-7) for e, yi in zip(evaluated, y))


@pytest.mark.parametrize("name", ["prodigy", "adamw_schedulefree"])
def test_a_missing_extra_is_a_config_error_naming_the_pip_command(name, monkeypatch):
    real = importlib.util.find_spec
    missing = optim.EXTRA_OPTIMIZERS[name][0]
    monkeypatch.setattr(optim.importlib.util, "find_spec", lambda module, *a: None if module == missing else real(module, *a))
    with pytest.raises(ConfigError, match=rf"train.optimizer: {name} needs the package {missing}.*{PIP_RE}"):
        optim.check_optimizer(TrainConfig(optimizer=name))
    with pytest.raises(ConfigError, match=PIP_RE):
        optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig(optimizer=name))


def test_unknown_optimizer_names_the_new_ones():
    with pytest.raises(ConfigError, match="did you mean 'prodigy'"):
        optim.check_optimizer(TrainConfig(optimizer="prodigi"))
