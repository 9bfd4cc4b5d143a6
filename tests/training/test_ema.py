"""``train.ema`` on a tiny Kontext run: the exported file holds an exponential moving average of the per-step
adapter weights (computed here independently, in float64, from what a test-only ``qflux_on_step`` callback
saw), validation (held-out loss and images) runs on the average and the trained weights come back bit for bit
after it, checkpoints carry the average and a resumed run's average equals the uninterrupted run's bitwise."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import qflux
from qflux.adapters.lora_files import baked_lora_state_dict
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.train import TrainResult, train
from qflux.testing import single_torch_thread, tiny_config, wrap_trainer, write_config
from qflux.training.ema import EMA_FILE

# updates at steps 4, 6, 8 (>= START and multiples of EVERY): step 2 is a multiple of EVERY before START, and the
# validation at step 6 sees an average of two steps' weights (at step 4 the average is a copy of the weights)
DECAY, EVERY, START, STEPS = 0.5, 2, 3, 8


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


class Spy:
    """Records each step's adapter weights, the weights every held-out loss and validation image ran on, and
    the weights the model holds when a validation is announced (after it)."""

    def __init__(self) -> None:
        self.start: Any = None
        self.steps: list[list[torch.Tensor]] = []
        self.evaluated: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.after_validation: dict[int, list[torch.Tensor]] = {}

    @property
    def step(self) -> int:
        return self.start.step + len(self.steps)

    def seen(self, what: str) -> None:
        self.evaluated.setdefault((what, self.step), snapshot(self.start.params))

    @qflux.hookimpl
    def qflux_on_start(self, event):
        self.start = event

    @qflux.hookimpl
    def qflux_on_step(self, event):
        self.steps.append(snapshot(event.params))

    @qflux.hookimpl
    def qflux_loss(self, prediction, noisy, batch, loss):
        if not torch.is_grad_enabled():  # a held-out loss
            self.seen("loss")

    @qflux.hookimpl
    def qflux_on_validation(self, event):
        self.after_validation[event.step] = snapshot(self.start.params)


def independent_ema(steps: list[list[torch.Tensor]], start: int = START, every: int = EVERY
                    ) -> dict[int, list[torch.Tensor] | None]:
    """step -> the average after it (None before the first update), in float64, from the textbook formula."""
    average, out = None, {}
    for step, weights in enumerate(steps, 1):
        if step >= start and step % every == 0:
            if average is None:
                average = [w.double() for w in weights]
            else:
                average = [DECAY * a + (1 - DECAY) * w.double() for a, w in zip(average, weights)]
        out[step] = average
    return out


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x.double(), y.double(), rtol=0, atol=1e-7) for x, y in zip(a, b, strict=True))


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@dataclass
class EmaRun:
    config: Any
    result: TrainResult
    spy: Spy
    run: Path


def ema_config(tmp: Path, cache: Path, **ema: Any):
    return load_config(write_config(tmp / "ema.yaml", tiny_config(
        tmp, train={"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 4, "ema": {"decay": DECAY, "every": EVERY, "start": START, **ema}},
        validation={"every": 6, "from_holdout": 1, "steps": 2}, cache={"enabled": True, "dir": str(cache)})))


def spied_train(config, spy: Spy, resume: bool = False) -> TrainResult:
    registry = build_registry(extra_plugins=[("spy", spy)])

    def sample(inner, bundle, request, **encoded):
        spy.seen("sample")
        return inner(bundle, request, **encoded)

    wrap_trainer(registry, "kontext", sample=sample)
    with single_torch_thread():
        return train(config, registry=registry, resume=resume)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> EmaRun:
    tmp = tmp_path_factory.mktemp("ema")
    config = ema_config(tmp, tmp_path_factory.getbasetemp() / "tiny-kontext-cache")
    spy = Spy()
    result = spied_train(config, spy)
    return EmaRun(config, result, spy, tmp / "run")


def test_the_export_holds_the_average_of_the_step_weights(ema_run):
    spy, result = ema_run.spy, ema_run.result
    assert len(spy.steps) == STEPS
    expected = independent_ema(spy.steps)[STEPS]
    transformer, params = spy.start.transformer, spy.start.params
    live = snapshot(params)
    assert equal(live, spy.steps[-1])  # after the export the model holds the trained weights again

    def exported_as(weights):  # the export of these weights: what the file must hold
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        return {f"transformer.{k}": v.clone() for k, v in baked_lora_state_dict(transformer).items()}

    want, trained = exported_as(expected), exported_as(live)
    shifted = exported_as(independent_ema(spy.steps, start=START - 1, every=1)[STEPS])  # another schedule
    exported_as(live)
    written = load_file(str(result.lora_path))
    assert written.keys() == want.keys()
    assert close([written[k] for k in want], [want[k] for k in want])
    assert not close([written[k] for k in want], [trained[k] for k in want])
    assert not close([written[k] for k in want], [shifted[k] for k in want])
    assert equal([result.lora[k] for k in sorted(result.lora)],
                 [v for _, v in sorted(load_file(str(ema_run.run / "checkpoints/step-000008/lora.safetensors")).items())])


def test_validation_runs_on_the_average_and_gives_the_trained_weights_back(ema_run):
    spy = ema_run.spy
    averages = independent_ema(spy.steps)
    # step 0: no average yet, the trained (initial) weights; steps 6 and 8: the average, loss and images alike
    assert {k for k in spy.evaluated} == {(w, s) for w in ("loss", "sample") for s in (0, 6, 8)}
    assert equal(spy.evaluated[("loss", 0)], spy.evaluated[("sample", 0)])
    for step in (6, 8):
        for what in ("loss", "sample"):
            assert close(spy.evaluated[(what, step)], averages[step]), (what, step)
        assert not close(spy.evaluated[("loss", step)], spy.steps[step - 1])
    # after each validation the model holds the trained weights of that step, bit for bit
    assert sorted(spy.after_validation) == [0, 6, 8]
    assert equal(spy.after_validation[0], spy.evaluated[("loss", 0)])
    assert all(equal(spy.after_validation[s], spy.steps[s - 1]) for s in (6, 8))


def test_checkpoints_carry_the_average(ema_run):
    spy = ema_run.spy
    averages = independent_ema(spy.steps)
    index_of = {id(p): i for i, p in enumerate(spy.start.params)}
    by_name = {n: index_of[id(p)] for n, p in spy.start.transformer.named_parameters() if id(p) in index_of}
    for step in (2, 4, 6, 8):
        path = ema_run.run / "checkpoints" / f"step-{step:06d}" / EMA_FILE
        with safe_open(str(path), "pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}
        if averages[step] is None:
            assert saved == {}  # before the first update: the file, empty
            continue
        assert all(v.dtype == torch.float32 for v in saved.values())
        assert set(saved) == set(by_name)
        assert close([saved[n] for n in by_name], [averages[step][i] for i in by_name.values()]), step


def test_a_resumed_run_continues_the_average_bitwise(ema_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(ema_run.run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000008")  # killed after step 6's checkpoint
    (copy / "pytorch_lora_weights.safetensors").unlink()
    config = ema_run.config.model_copy(update={"output": ema_run.config.output.model_copy(update={"dir": str(copy)})})
    spy = Spy()
    resumed = spied_train(config, spy, resume=True)
    assert resumed.resumed_from == copy / "checkpoints" / "step-000006"
    assert spy.start.checkpoint == resumed.resumed_from
    assert resumed.losses == ema_run.result.losses[6:]
    # the first held-out loss of the resumed run is of the average read back from the checkpoint
    assert equal(spy.evaluated[("loss", 6)], ema_run.spy.evaluated[("loss", 6)])
    for name in ("pytorch_lora_weights.safetensors", f"checkpoints/step-000008/{EMA_FILE}",
                 "checkpoints/step-000008/lora.safetensors"):
        want, got = load_file(str(ema_run.run / name)), load_file(str(copy / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
