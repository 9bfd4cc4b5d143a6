"""Shared by tests/adapters: one tiny training run per (trainer, adapter settings), its bitwise resume, and the
weight changes a trained adapter makes.

A run is the real trainer on ``builtin:tiny`` at 32 px: STEPS steps with a checkpoint at SAVE_EVERY and one at
the end. The export and the last checkpoint's adapter file are copied aside; then the last checkpoint and the
export are deleted (a run killed after step SAVE_EVERY) and the run is resumed to STEPS: that second result must
be bitwise the first.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.train import TrainResult, train
from qflux.testing import single_torch_thread, tiny_config, write_config

STEPS, SAVE_EVERY = 3, 2
TRAINERS = ("kontext", "qwen-edit")


@dataclass
class Run:
    trainer: str
    config: Any  # the validated QfluxConfig
    full: TrainResult  # the uninterrupted run
    resumed: TrainResult  # resumed from step SAVE_EVERY
    export: Path  # a copy of the uninterrupted run's export
    checkpoint: Path  # a copy of its last checkpoint's adapter file (checkpoints/step-STEPS/lora.safetensors)
    resumed_export: dict[str, torch.Tensor]

    @property
    def adapter(self):
        return build_registry().adapter(self.config.model.adapter)

    @property
    def options(self):
        return self.adapter.options_of(self.config.model)


def train_and_resume(root: Path, trainer: str, model: dict[str, Any], cache: Path) -> Run:
    name = f"{trainer}-{model.get('adapter', 'lora')}-{len(list(root.iterdir()))}"
    config = tiny_config(root, trainer, model=model, cache={"enabled": True, "dir": str(cache)},
                         train={"max_steps": STEPS, "save_every": SAVE_EVERY, "batch_size": 2},
                         output={"dir": str(root / name)})
    config = load_config(write_config(root / f"{name}.yaml", config))
    run = Path(config.output.dir)
    with single_torch_thread():
        full = train(config)
        keep = root / f"{name}-files"
        keep.mkdir()
        export = Path(shutil.copy(full.lora_path, keep / full.lora_path.name))
        last = run / "checkpoints" / f"step-{STEPS:06d}"
        checkpoint = Path(shutil.copy(last / "lora.safetensors", keep / "checkpoint.safetensors"))
        shutil.rmtree(last)
        full.lora_path.unlink()
        resumed = train(config, resume=True)
    return Run(trainer, config, full, resumed, export, checkpoint, load_file(str(resumed.lora_path)))


_BASES: dict[str, torch.nn.Module] = {}


def base(trainer: str) -> torch.nn.Module:
    """A fresh copy of the tiny float32 transformer of ``trainer`` (built once per process)."""
    if trainer not in _BASES:
        from qflux.config.schema import ModelConfig

        model = ModelConfig(pretrained="builtin:tiny", dtype="float32")
        _BASES[trainer] = build_registry().trainer(trainer).load_transformer(model)
    return copy.deepcopy(_BASES[trainer])


def merged_deltas(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> peft's merged weight minus the base weight, for every adapted layer, in float64 (on a copy):
    in float32 the subtraction alone loses ~1e-5 of a small change to the weight's rounding."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(transformer).double()
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            before = module.get_base_layer().weight.detach().clone()
            module.merge()
            deltas[name] = module.get_base_layer().weight.detach() - before
    return deltas


def trained_deltas(run: Run) -> dict[str, torch.Tensor]:
    """The weight changes of the uninterrupted run's final adapter: attached to a fresh base, state loaded, merged."""
    transformer = base(run.trainer)
    run.adapter.attach(transformer, run.options)
    run.adapter.load_state(transformer, run.full.lora)
    return merged_deltas(transformer)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|; |a| when b is zero (a module whose output the loss never sees keeps a zero change)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else a.norm().item()


def assert_merged(after: torch.Tensor, before: torch.Tensor, delta: torch.Tensor, what: str) -> None:
    """``after`` (a float32 weight with a change merged in) is ``before + delta`` to float32 rounding: within a few
    units in the last place of the weight (the change alone cannot be read back closer than that)."""
    error = (after.double() - before.double() - delta.double()).abs().max().item()
    ulp = torch.finfo(before.dtype).eps * before.abs().max().item()
    assert error <= 4 * ulp, f"{what}: merged weight is off by {error:.3g} (float32 rounding: {ulp:.3g})"


def assert_bitwise_resume(run: Run) -> None:
    assert run.resumed.steps == STEPS and len(run.full.losses) == STEPS
    assert run.resumed.losses == run.full.losses[SAVE_EVERY:]
    assert run.full.lora and run.resumed.lora.keys() == run.full.lora.keys()
    changed = [k for k in run.full.lora if not torch.equal(run.full.lora[k], run.resumed.lora[k])]
    assert not changed, f"resume differs in {len(changed)} tensors, e.g. {changed[:2]}"
    exported = load_file(str(run.export))
    assert exported.keys() == run.resumed_export.keys()
    assert all(torch.equal(exported[k], run.resumed_export[k]) for k in exported)
