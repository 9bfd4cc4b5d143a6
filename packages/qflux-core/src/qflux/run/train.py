"""A training run: ``train(config) -> TrainResult``, as a list of phases.

start (plugins, process group, timestep shift) -> the lock of output.dir (``qflux.run.lock``: one run per
folder, held until ``train`` returns) -> resume point -> encode the dataset (or read the cache) and the
validation requests, then free the encoders but the VAE (``run.encode``) -> load the models (transformer,
quantizer, adapter) -> optimizer -> DDP or FSDP -> run folder -> validation at step 0 -> steps (validation,
checkpoints, Ctrl-C) -> finish (last validation, checkpoint, export).
Only the main process writes files; every rank runs the same number of micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from qflux.config.schema import QfluxConfig
from qflux.plugins import Registry
from qflux.training.fingerprint import config_fingerprint

if TYPE_CHECKING:
    from qflux.run.context import Run

__all__ = ["TrainResult", "config_fingerprint", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path | None  # None on non-main processes
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this invocation
    val_loss_start: float | None = None
    val_loss_end: float | None = None
    resumed_from: Path | None = None
    lora: dict[str, torch.Tensor] = field(default_factory=dict)  # final adapter tensors of this process (CPU)


def train(config: QfluxConfig, registry: Registry | None = None, resume: bool | Path = False,
          console: Console | None = None, records: list | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns where the LoRA went and the losses seen. ``records``:
    the dataset's records when the caller has them already (``qflux train``: preflight's checked records),
    else the dataset is opened here."""
    from qflux.run.lock import RunLock
    from qflux.run.setup import start

    run = start(config, registry, console)
    # only the main process writes the folder, so only it takes the lock (released on any exit, and by the OS
    # when the process dies); a second run into output.dir is refused here, before any work
    with RunLock(run.output_dir, enabled=run.is_main, warn=run.console.print):
        return _train(run, resume, records)


def _train(run: Run, resume: bool | Path, records: list | None) -> TrainResult:
    from accelerate.utils import set_seed

    from qflux.run.encode import encode_phase
    from qflux.run.models import training_models
    from qflux.run.setup import announce_start, describe_models, open_run_folder, optimisation, resume_from
    from qflux.run.steps import Loop, finish, run_steps
    from qflux.run.validator import Validator
    from qflux.training.metrics import MetricsLog
    from qflux.training.strategy import prepare

    config = run.config
    resumed = resume_from(run, resume)
    if resumed.finished:
        return TrainResult(output_dir=run.output_dir, steps=resumed.checkpoint.position.step, resumed_from=resumed.path,
                           lora_path=run.output_dir / run.selection.adapter.file_name if run.is_main else None)
    set_seed(config.train.seed, device_specific=False)  # model init in plugins that use the global RNG
    data = encode_phase(run, records)
    models = training_models(run.selection, config)
    if config.train.compile:  # after the adapter is attached: its layers compile inside the blocks
        from qflux.training.compile import compile_blocks

        compile_blocks(models.transformer, run.device, run.console.print, config.train.compile_backend)
    describe_models(run, len(data.train_set), len(data.holdout_set), models.params)
    optimizer, lr_scheduler, position = optimisation(run, models.transformer, models.params, resumed)
    strategy = prepare(run.accelerator, models.transformer, models.params, optimizer, config.train.fsdp,
                       run.console.print)
    open_run_folder(run)
    metrics = MetricsLog(run.output_dir) if run.is_main else None
    if metrics and resumed.checkpoint is not None:  # one row per resume: config.yaml holds the new values
        metrics.log(position.step, resumed_from=str(resumed.path), changed={c.key: [c.old, c.new] for c in resumed.changes})
    validator = Validator(run, strategy, data, metrics)
    result = TrainResult(output_dir=run.output_dir, lora_path=None, steps=position.step, resumed_from=resumed.path)
    announce_start(run, strategy.transformer, models.params, resumed, position.step)  # qflux_on_start
    result.val_loss_start = first_validation(run, validator, metrics, position.step)
    loop = Loop(run, strategy, data, models.params, lr_scheduler, validator, metrics, position)
    start_step = position.step
    boundary = run_steps(loop)
    result.steps, result.losses = position.step, loop.losses
    result.lora = run.selection.adapter.state_dict(run.unwrap(strategy.transformer))
    result.lora_path, result.val_loss_end = finish(loop, boundary, start_step)
    return result


def first_validation(run, validator, metrics, step: int) -> float | None:
    """The held-out loss before the first step of this invocation, and the images at step 0."""
    val = validator.evaluate(step)
    if val is not None:
        run.console.print(f"held-out validation loss at step {step}: {val:.5f}")
        if metrics:
            metrics.log(step, val_loss=val)
    rendered = step == 0 and run.config.validation.every and validator.data.sampling_on
    fidelity = validator.sample(0) if step == 0 and run.config.validation.every else {}
    if val is not None or rendered:  # validation ran, the same on every rank
        validator.announce(step, val, fidelity)
    return val
