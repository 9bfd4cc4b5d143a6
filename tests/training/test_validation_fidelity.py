"""Validation measures edit fidelity and keeps the best step's LoRA: a real tiny Kontext run on builtin:shapes,
then the pieces (per-case measurement, the selector's directions, the config check) on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qflux.config import load_config
from qflux.errors import ConfigError
from qflux.run.train import train
from qflux.testing import single_torch_thread, tiny_config, write_config
from qflux.training.best import DIRECTIONS, BestSelector, check_select_best
from qflux.training.val_fidelity import KEYS, measure_case, summarize

VAL_STEPS = [0, 2, 4, 6]


def test_run_logs_fidelity_and_exports_the_best_steps_lora(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path,
        train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 10, "lr": 5e-2},
        validation={"every": 2, "steps": 2, "from_holdout": 2, "select_best": "val_zoom"},
    )))
    with single_torch_thread():
        train(config)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fidelity = {r["step"]: r for r in rows if "val_fidelity" in r}
    assert sorted(fidelity) == VAL_STEPS
    for row in fidelity.values():  # every key, per case and as the mean over the cases
        assert set(KEYS) <= row.keys()
        assert len(row["val_fidelity"]) == 2
        for key in KEYS:
            assert row[key] == pytest.approx(np.mean([c[key.removeprefix("val_")] for c in row["val_fidelity"]]),
                                             abs=1e-3)
    assert (run / "fidelity.png").is_file() and (run / "samples" / "step-000006.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in KEYS:
        assert [e.step for e in events.Scalars(key)] == VAL_STEPS

    # the best step: closest zoom to 1 among the trained validation steps (step 0 is the untrained LoRA)
    best_step = min(VAL_STEPS[1:], key=lambda s: abs(np.log(fidelity[s]["val_zoom"])))
    record = json.loads((run / "best" / "best.json").read_text())
    assert record == {"metric": "val_zoom", "step": best_step, "value": pytest.approx(fidelity[best_step]["val_zoom"],
                                                                                       abs=1e-3)}
    best = load_file(str(run / "best" / "pytorch_lora_weights.safetensors"))
    at_step = load_file(str(run / "checkpoints" / f"step-{best_step:06d}" / "lora.safetensors"))
    assert {k.removeprefix("transformer."): v for k, v in best.items()}.keys() == at_step.keys()
    assert all(torch.equal(best["transformer." + k], v) for k, v in at_step.items())  # rank 4 = alpha 4: scale 1
    others = [s for s in VAL_STEPS[1:] if s != best_step]
    for step in others:  # and no other step's: the file is not merely the last one written
        other = load_file(str(run / "checkpoints" / f"step-{step:06d}" / "lora.safetensors"))
        assert not all(torch.equal(best["transformer." + k], v) for k, v in other.items())


def _scene(w: int, h: int, dx: int = 0) -> Image.Image:
    rng = np.random.default_rng(0)
    big = rng.random((h // 4 + 4, w // 4 + 4, 3))
    smooth = np.asarray(Image.fromarray((big * 255).astype(np.uint8)).resize((w + 16, h + 16), Image.BICUBIC))
    return Image.fromarray(np.ascontiguousarray(smooth[8:8 + h, 8 - dx:8 - dx + w]))


def test_measure_case_against_control_target_and_mask():
    control = _scene(96, 64)
    target = np.asarray(control).copy()
    target[16:48, 24:72] = (255, 0, 0)  # the edit
    target = Image.fromarray(target)
    sample = np.asarray(_scene(96, 64, dx=3)).copy()  # the picture moved 3 px right, and the edit done
    sample[16:48, 24:72] = (250, 10, 0)
    sample = Image.fromarray(sample)
    case = measure_case([control.resize((192, 128))], target, None, sample)  # a larger control of the same aspect
    assert case.dx == pytest.approx(3, abs=0.5) and case.dy == pytest.approx(0, abs=0.5)
    assert case.zoom == pytest.approx(1, abs=0.01) and case.match > 0.5
    assert case.edit_change == pytest.approx(case.target_change, abs=0.05)
    assert case.unedited_psnr < 30  # the shift shows outside the edit
    still = measure_case([control], target, None, target)  # a perfect edit
    assert still.shift_px < 0.3 and still.unedited_psnr == 100.0
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (24, 16, 72, 48))
    assert measure_case([control], None, mask, target).unedited_psnr is None  # no target: no PSNR, still a shift
    assert measure_case([control.resize((64, 64))], target, None, target).shift_px is None  # another aspect
    means = summarize([case, still])
    assert means["val_shift_px"] == pytest.approx((case.shift_px + still.shift_px) / 2, abs=1e-3)


def test_selector_directions_and_resume(tmp_path):
    exported = []

    def export(directory):
        directory.mkdir(parents=True, exist_ok=True)
        exported.append(directory)
        return directory / "pytorch_lora_weights.safetensors"

    cases = {"val_loss": [0.5, 0.4, 0.45], "val_shift_px": [3.0, 1.0, 2.0], "val_unedited_psnr": [20.0, 30.0, 25.0],
             "val_zoom": [1.1, 0.99, 1.03]}
    assert set(cases) == set(DIRECTIONS)
    for metric, values in cases.items():
        selector = BestSelector(metric, tmp_path / metric)
        assert selector.offer(0, {metric: 0.0 if metric != "val_zoom" else 1.0}, export) is None  # step 0: never
        kept = [selector.offer(step, {metric: v}, export) for step, v in zip((2, 4, 6), values)]
        assert [k is not None for k in kept] == [True, True, False], metric  # a flipped direction fails here
        assert selector.best.step == 4
        assert selector.offer(8, {}, export) is None  # not measured at this step
        resumed = BestSelector(metric, tmp_path / metric)  # a resumed run continues the comparison
        assert resumed.best == selector.best
    assert BestSelector("val_loss", tmp_path / "val_zoom").best is None  # a record of another metric is not used


@pytest.mark.parametrize("metric,validation,data,message", [
    ("val_loss", {"every": 2}, {"holdout": 0}, "data.holdout"),
    ("val_loss", {"every": 0}, {"holdout": 2}, "validation.every"),
    ("val_shift_px", {"every": 2}, {"holdout": 2}, "validation.samples"),
    ("val_unedited_psnr", {"every": 2, "samples": [{"prompt": "p", "control": ["c.png"]}]}, {"holdout": 0}, "target"),
])
def test_select_best_on_a_metric_never_measured_is_refused(tmp_path, metric, validation, data, message):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, validation={**validation, "select_best": metric}, data=data)))
    with pytest.raises(ConfigError, match=message):
        check_select_best(config)


def test_select_best_is_checked_by_config_check(tmp_path):
    from qflux.plugins import build_registry
    from qflux.run.preflight import check_config

    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, validation={"every": 2, "select_best": "val_loss"}, data={"holdout": 0})))
    with pytest.raises(ConfigError, match="select_best"):
        check_config(config, build_registry())
