"""The first phases of a training run: the process group and the selected plugins (``start``), then where
to start (``resume_from``: a run is never overwritten, ``--resume`` never restarts silently)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qflux.config.schema import QfluxConfig
from qflux.errors import UserError
from qflux.plugins import Registry
from qflux.run.context import Run
from qflux.run.models import Selection
from qflux.training import checkpoint as ckpt
from qflux.training.fingerprint import config_fingerprint
from qflux.training.resume import Change, describe_changes, resume_changes


def start(config: QfluxConfig, registry: Registry | None, console: Console | None) -> Run:
    """The plugins, the ``Accelerator`` (one per call), the console and the model's timestep shift."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    from qflux.plugins import build_registry  # looked up per call, not bound at import (tests replace it)
    from qflux.training.launch import check_world_size
    from qflux.training.sharding import check_fsdp
    from qflux.training.shift_source import model_shift

    registry = registry or build_registry()
    selection = Selection.of(config, registry)
    check_fsdp(config)
    # accelerate keeps its settings in a process-wide singleton; drop them (not the process group) so that
    # a second train() in one process (a notebook, a test) may use another mixed precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, ask accelerate for CPU explicitly: only then does a torchrun-style launch
    # (`accelerate launch --multi_gpu`) become a multi-process gloo run instead of N single-process runs.
    # A bounded wait in every collective (train.collective_timeout, not the backend's 30 min): where the
    # launcher does not tear the group down when a rank dies (multi-node, plain torchrun), the others stop
    # with an error after this long instead of hanging. Only applies when this call creates the group.
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=config.train.collective_timeout))
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.grad_accum,
                              cpu=not torch.accelerator.is_available(), kwargs_handlers=[timeout])
    check_world_size(accelerator.num_processes)  # a launch of N processes that started one: refused
    console = console or Console(stderr=True, quiet=not accelerator.is_main_process, soft_wrap=True,
                                 highlight=False)
    # The model's own shift constants: read once (not per step), before anything slow, and only when the
    # scheme uses them (a hub model's scheduler config is a download).
    shift = None
    if config.train.timestep_sampling == "resolution_shift":
        rule = selection.trainer.shift_rule(config.model)  # a rule of its own, else its scheduler config's
        found = model_shift(selection.trainer, config.model) if rule is None else None
        shift = rule if rule is not None else found.constants
        console.print((rule or found).describe())
    return Run(config, registry, selection, accelerator, console, config_fingerprint(config), shift)


@dataclass
class ResumeState:
    """Where this invocation starts: nothing (a fresh run) or a checkpoint, and what the config changes."""

    path: Path | None = None
    checkpoint: ckpt.Checkpoint | None = None
    changes: list[Change] = field(default_factory=list)
    finished: bool = False  # the checkpoint is the last step and the LoRA is exported: nothing to do


def resume_from(run: Run, resume: bool | Path) -> ResumeState:
    from qflux.run.preflight import check_same_config
    from qflux.training.run_folder import Remaining, nothing_to_do, remaining_work, resume_point

    config, output_dir = run.config, run.output_dir
    how = Path(resume) if isinstance(resume, (str, Path)) else bool(resume)
    adapter_file = run.selection.adapter.file_name
    path = resume_point(output_dir, how, run.console.print, adapter_file)
    if path is None:
        return ResumeState()
    if ckpt.verify(path) is not None:
        raise UserError(f"checkpoint {path} is unusable: {ckpt.verify(path)}")
    state = ckpt.load_checkpoint(path)
    if state.position.processes != run.world:
        raise UserError(f"checkpoint {path} was written by a run of {state.position.processes} process(es); "
                        f"this one has {run.world}: its data position would not match. Resume "
                        "with the same process count (or start a new output.dir)")
    check_same_config(path, state.position.config_fingerprint, config)
    left = remaining_work(output_dir, path, state.position.step, config.train.max_steps, adapter_file)
    if left is Remaining.NOTHING:
        run.console.print(nothing_to_do(output_dir, state.position.step, config.train.max_steps, adapter_file))
        return ResumeState(path, state, finished=True)
    changes = resume_changes(path, state.optimizer, state.lr_scheduler, config)
    if changes:
        run.console.print(describe_changes(changes, state.position.step))
    return ResumeState(path, state, changes)


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def optimisation(run: Run, transformer: torch.nn.Module, params: list[torch.nn.Parameter],
                 resumed: ResumeState) -> tuple[Any, Any, Position]:
    """The optimizer and LR scheduler of the adapter's parameters, restored from the checkpoint when resuming
    (with the new config's hyperparameters applied at the restored step). A schedule-free optimizer is left in
    train mode (a checkpoint holds its training weights and its state in train mode: ``qflux.run.weights``)."""
    from qflux.training.optim import build_lr_scheduler, build_optimizer, has_eval_mode

    optimizer = build_optimizer(params, run.config.train)
    lr_scheduler = build_lr_scheduler(optimizer, run.config.train)
    state = resumed.checkpoint
    if state is not None:
        restore(run, transformer, optimizer, lr_scheduler, resumed)
    if has_eval_mode(optimizer):
        optimizer.train()
    if state is None:
        return optimizer, lr_scheduler, Position()
    return optimizer, lr_scheduler, Position(state.position.step, state.position.epoch,
                                             state.position.batch_in_epoch)


def restore(run: Run, transformer: torch.nn.Module, optimizer: Any, lr_scheduler: Any, resumed: ResumeState) -> None:
    """The checkpoint's adapter weights, optimizer and LR scheduler state, with the new config's
    hyper-parameters on top."""
    from qflux.training.resume import apply_hyperparameters, hyperparameters

    state = resumed.checkpoint
    run.selection.adapter.load_state(transformer, state.lora)
    fresh = hyperparameters(optimizer)  # the restored state dicts bring the old lr / weight_decay back:
    optimizer.load_state_dict(state.optimizer)
    lr_scheduler.load_state_dict(state.lr_scheduler)
    apply_hyperparameters(optimizer, lr_scheduler, fresh)  # the new config's, at the restored step
    run.console.print(f"resumed from {resumed.path} at step {state.position.step}")


def announce_start(run: Run, transformer: torch.nn.Module, params: list[Any], resumed: ResumeState,
                   step: int) -> None:
    """``qflux_on_start``: the run is ready (the run folder exists, a resumed state is loaded)."""
    from qflux.events import StartEvent

    run.hook.qflux_on_start(event=StartEvent(step, resumed.path, run.unwrap(transformer), run.selection.adapter,
                                             params, run.config, run.is_main))


def open_run_folder(run: Run) -> None:
    """Every process has judged output.dir (run_folder) before the main one writes into it; only now, so a
    run that fails while loading leaves no output folder behind."""
    import yaml

    run.accelerator.wait_for_everyone()
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "config.yaml").write_text(
            yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


def describe_models(run: Run, train_count: int, holdout_count: int, params: list[Any]) -> None:
    kind = "LoRA" if run.selection.adapter.name == "lora" else run.selection.adapter.name
    run.console.print(f"{train_count} training samples, {holdout_count} held out, "
                      f"{sum(p.numel() for p in params):,} {kind} parameters")
