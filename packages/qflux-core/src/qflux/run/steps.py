"""The step loop of a training run and its end: optimizer steps with gradient accumulation, logging,
validation, checkpoints and Ctrl-C between steps; then the last validation, checkpoint and the export."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qflux.errors import TrainingStopped
from qflux.events import CheckpointEvent, ExportEvent, StepEvent
from qflux.run.context import Run
from qflux.run.encode import EncodedData
from qflux.run.setup import Position
from qflux.run.validator import Validator
from qflux.training import checkpoint as ckpt
from qflux.training.strategy import Strategy


@dataclass
class Loop:
    """The moving parts of the step loop."""

    run: Run
    strategy: Strategy
    data: EncodedData
    params: list[Any]
    lr_scheduler: Any
    validator: Validator
    metrics: Any  # MetricsLog on the main process, else None
    position: Position
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this invocation
    # The state at the last optimizer step: what a checkpoint records (an interrupted gradient accumulation
    # is replayed on resume, so a resumed run equals an uninterrupted one).
    boundary: ckpt.TrainingPosition | None = None

    def save(self, boundary: ckpt.TrainingPosition) -> Path | None:
        """A checkpoint of the state at ``boundary`` (main process writes; every process waits)."""
        from qflux.adapters.base import STATE_DIGEST, state_digest
        from qflux.data.trained_sizes import sizes_metadata  # a checkpoint samples at the trained sizes too

        run, path = self.run, None
        if run.is_main:
            adapter = run.selection.adapter
            # the training weights (schedule-free: y, the optimizer in train mode): a resume continues exactly
            state = adapter.state_dict(run.unwrap(self.strategy.transformer))
            metadata = {**adapter.checkpoint_metadata(run.selection.adapter_options(run.config)),
                        **sizes_metadata(run.config.data), STATE_DIGEST: state_digest(state)}
            files = plugin_files(run, boundary.step)
            path = ckpt.save_checkpoint(run.output_dir, boundary, state, self.strategy.optimizer, self.lr_scheduler,
                                        run.config.train.keep_checkpoints, lora_metadata=metadata, extra_files=files)
        run.accelerator.wait_for_everyone()
        run.hook.qflux_on_checkpoint(event=CheckpointEvent(boundary.step, path, run.config, run.is_main))
        return path


def plugin_files(run: Run, step: int) -> dict[str, bytes]:
    """The files run callbacks add to the checkpoint of ``step`` (``qflux_checkpoint_files``); a name taken
    twice (or one of the core's) is a ``PluginError``."""
    from qflux.errors import PluginError

    event = CheckpointEvent(step, ckpt.checkpoint_dir(run.output_dir, step), run.config, run.is_main)
    files: dict[str, bytes] = {}
    for contributed in run.hook.qflux_checkpoint_files(event=event):
        for name, data in contributed.items():
            if name in files or name in ckpt.CORE_FILES or "/" in name or name.startswith("."):
                raise PluginError(f"qflux_checkpoint_files: the file name {name!r} is taken or not a plain file "
                                  f"name (the core writes {', '.join(sorted(ckpt.CORE_FILES))})")
            files[name] = data
    return files


def run_steps(loop: Loop) -> ckpt.TrainingPosition:
    """Optimizer steps up to ``train.max_steps``; returns the position of the last one. Ctrl-C takes effect
    between optimizer steps and leaves a checkpoint of the last one."""
    from qflux.training.batching import BucketBatchSampler
    from qflux.training.encoding import signatures_of
    from qflux.training.interrupt import InterruptFlag
    from qflux.training.progress import TrainProgress

    run, position = loop.run, loop.position
    start_step = position.step
    sampler = BucketBatchSampler(signatures_of(loop.data.train_set), run.config.train.batch_size * run.world,
                                 run.config.train.seed)
    loop.strategy.transformer.train()
    loop.boundary = ckpt.TrainingPosition(position.step, position.epoch, position.batch_in_epoch, run.fingerprint,
                                          run.world)
    interrupt = InterruptFlag()
    try:
        with TrainProgress(run.console, total=run.config.train.max_steps, start=position.step,
                           enabled=run.is_main) as progress:
            _epochs(loop, sampler, progress, interrupt)
    except KeyboardInterrupt:
        boundary = loop.boundary
        if boundary.step > start_step:
            path = loop.save(boundary)
            run.console.print(f"interrupted: checkpoint of step {boundary.step} written to {path}; "
                              "continue with: qflux train --config ... --resume")
        else:
            run.console.print(f"interrupted before the first optimizer step after step {start_step}; nothing to save")
        if loop.metrics:
            loop.metrics.close()
        raise
    finally:
        interrupt.restore()
    return loop.boundary


def _epochs(loop: Loop, sampler: Any, progress: Any, interrupt: Any) -> None:
    from qflux.training.batching import rank_batches

    run, position, max_steps = loop.run, loop.position, loop.run.config.train.max_steps
    started = time.perf_counter()
    micro_loss: list[float] = []
    while position.step < max_steps:
        epoch_batches = rank_batches(sampler, position.epoch, run.rank, run.world)
        while position.batch_in_epoch < len(epoch_batches) and position.step < max_steps:
            mine = epoch_batches[position.batch_in_epoch]
            position.batch_in_epoch += 1
            micro_loss.append(_micro_step(loop, mine))
            if not run.accelerator.sync_gradients:
                continue
            loop.lr_scheduler.step()
            position.step += 1
            step_loss = sum(micro_loss) / len(micro_loss)
            micro_loss.clear()
            epoch_done = position.batch_in_epoch >= len(epoch_batches)
            loop.boundary = ckpt.TrainingPosition(position.step, position.epoch + 1 if epoch_done else position.epoch,
                                                  0 if epoch_done else position.batch_in_epoch, run.fingerprint,
                                                  run.world)
            _after_step(loop, step_loss, progress, started)
            _periodic(loop, loop.boundary)
            if interrupt.agreed(run.accelerator):  # Ctrl-C takes effect here, between optimizer steps
                raise KeyboardInterrupt
        if position.batch_in_epoch >= len(epoch_batches):
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0


def _micro_step(loop: Loop, mine: Any) -> float:
    """One micro-batch; a non-finite loss stops the run before any weight changes."""
    from qflux.training.step import make_batch, micro_step

    run, config = loop.run, loop.run.config
    batch, generators = make_batch([loop.data.train_set[i] for i in mine.indices], config, loop.position.epoch,
                                   run.device, run.dtype)
    value = micro_step(run.accelerator, run.hook, run.trainer, loop.strategy.transformer, batch, config, generators,
                       loop.params, loop.strategy.optimizer, loop.strategy.grad_sync, mine.loss_scale, run.shift)
    if not math.isfinite(value):
        kept = ckpt.latest_valid(run.output_dir, run.console.print)
        raise TrainingStopped(
            f"loss is {value} at step {loop.position.step + 1} (samples {', '.join(batch.keys)}): training "
            f"diverged. Last good checkpoint: {kept or 'none'}. Lower train.lr, set "
            "train.max_grad_norm, or check these samples; then resume with --resume.")
    return value


def _after_step(loop: Loop, step_loss: float, progress: Any, started: float) -> None:
    run, step = loop.run, loop.position.step
    loop.losses.append(step_loss)
    lr = loop.lr_scheduler.get_last_lr()[0]
    progress.update(step, step_loss, lr)
    if loop.metrics and step % run.config.train.log_every == 0:
        loop.metrics.log(step, loss=step_loss, lr=lr, elapsed=round(time.perf_counter() - started, 3))
    run.hook.qflux_on_step(event=StepEvent(step, step_loss, lr, run.unwrap(loop.strategy.transformer),
                                           run.selection.adapter, loop.params, run.config, run.is_main))


def _periodic(loop: Loop, boundary: ckpt.TrainingPosition) -> None:
    """Validation and checkpoints on their schedules (the last step's are the end's)."""
    config, step = loop.run.config, loop.position.step
    if config.validation.every and step % config.validation.every == 0 and step < config.train.max_steps:
        loop.validator.validate(step)
    if config.train.save_every and step % config.train.save_every == 0 and step < config.train.max_steps:
        loop.save(boundary)


def finish(loop: Loop, boundary: ckpt.TrainingPosition, start_step: int) -> tuple[Path | None, float | None]:
    """The last validation, the last checkpoint and the export; returns the adapter file (main process; None
    on the others) and the final held-out loss."""
    from qflux.training.metrics import plot_fidelity, plot_loss

    run, validator, step = loop.run, loop.validator, loop.position.step
    config = run.config
    fidelity_end: dict[str, float] = {}
    val_end = validator.evaluate(step)
    if val_end is not None:
        run.console.print(f"held-out validation loss at step {step}: {val_end:.5f}")
    if config.validation.every and step > start_step:  # a resume that only exports rendered them already
        fidelity_end = validator.sample(step)
    if config.train.save_every:
        loop.save(boundary)
    path = None
    if run.is_main:
        if val_end is not None:
            loop.metrics.log(step, val_loss=val_end)
        if config.validation.every and step > start_step:
            validator.offer_best(step, {"val_loss": val_end, **fidelity_end})
        path = validator.export(run.output_dir, "export", step)
        loop.metrics.close()
        plot_loss(loop.metrics.path, run.output_dir / "loss.png")
        plot_fidelity(loop.metrics.path, run.output_dir / "fidelity.png")
        run.console.print(f"{run.selection.adapter.name if run.selection.adapter.name != 'lora' else 'LoRA'} "
                          f"written to {path}")
    rendered = config.validation.every and step > start_step and validator.data.sampling_on
    if val_end is not None or rendered:  # validation ran (a held-out loss or images), the same on every rank
        validator.announce(step, val_end, fidelity_end)
    run.accelerator.wait_for_everyone()
    run.hook.qflux_on_export(event=ExportEvent(step, path, config, run.is_main))
    return path, val_end
