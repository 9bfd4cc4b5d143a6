"""The model-agnostic training loop: ``train(config) -> TrainResult``.

Order: plugins -> data records -> transformer (+ quantize, LoRA) -> encode (or cache) -> steps with
gradient accumulation, clipping, LR schedule, checkpoints, validation loss and sampling -> export.
Only the main process writes files; every rank runs the same number of micro-batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console

from qflux.cache.build import open_cache
from qflux.config.preflight import check_same_config
from qflux.config.schema import QfluxConfig
from qflux.errors import TrainingStopped, UserError
from qflux.model_source import torch_dtype
from qflux.plugins import Registry, build_registry
from qflux.training import checkpoint as ckpt
from qflux.training.batching import BucketBatchSampler, collate, rank_batches
from qflux.training.best import BestSelector
from qflux.training.encoding import (
    LazyEncoders,
    encode_records,
    fill_cache,
    prepare_samples,
    signatures_of,
)
from qflux.training.launch import check_world_size
from qflux.training.lora import (
    LORA_FILE,
    attach_lora,
    checkpoint_lora_metadata,
    export_lora,
    load_lora_state,
    lora_state_dict,
)
from qflux.training.metrics import MetricsLog, plot_fidelity, plot_loss
from qflux.training.optim import build_lr_scheduler, build_optimizer
from qflux.training.progress import TrainProgress
from qflux.training.resume import Change, apply_hyperparameters, describe_changes, hyperparameters, resume_changes
from qflux.training.run_folder import Remaining, nothing_to_do, remaining_work, resume_point
from qflux.training.sharding import all_reduce_mean, check_fsdp, shard_frozen_base
from qflux.training.shift_source import model_shift
from qflux.training.step import make_batch, micro_step, validation_loss_sum
from qflux.types import ModelBundle


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path | None  # None on non-main processes
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this invocation
    val_loss_start: float | None = None
    val_loss_end: float | None = None
    resumed_from: Path | None = None
    lora: dict[str, torch.Tensor] = field(default_factory=dict)  # final LoRA tensors of this process (CPU)


def config_fingerprint(config: QfluxConfig) -> str:
    """Hash of what a resumed run must share with the run that wrote the checkpoint."""
    keep = {
        "trainer": config.trainer,
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", include={"batch_size", "grad_accum", "seed", "optimizer",
                                                                 "timestep_sampling"}),
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class InterruptFlag:
    """Turns the first Ctrl-C into a flag the loop checks between optimizer steps (so a checkpoint never mixes
    weights of one step with the position of another); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def agreed(self, accelerator) -> bool:
        """True on every rank as soon as any rank was interrupted (one tiny all-reduce per step when N > 1)."""
        if accelerator.num_processes == 1:
            return self.raised
        flag = torch.tensor([1.0 if self.raised else 0.0], device=accelerator.device)
        return float(accelerator.reduce(flag, reduction="sum")) > 0

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(config: QfluxConfig, registry: Registry | None = None, resume: bool | Path = False,
          console: Console | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns where the LoRA went and the losses seen."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qflux.data import load_sample, open_records, split_holdout

    registry = registry or build_registry()
    hook = registry.hook
    trainer = registry.trainer(config.trainer)
    if config.model.quantize:
        registry.quantizer(config.model.quantize)
    check_fsdp(config)
    # accelerate keeps its settings in a process-wide singleton; drop them (not the process group) so that
    # a second train() in one process (a notebook, a test) may use another mixed precision.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, ask accelerate for CPU explicitly: only then does a torchrun-style launch
    # (`accelerate launch --multi_gpu`) become a multi-process gloo run instead of N single-process runs.
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.grad_accum,
                              cpu=not torch.accelerator.is_available())
    check_world_size(accelerator.num_processes)  # a launch of N processes that started one: refused
    is_main = accelerator.is_main_process
    console = console or Console(stderr=True, quiet=not is_main, soft_wrap=True, highlight=False)
    output_dir = Path(config.output.dir)
    fingerprint = config_fingerprint(config)
    # The model's own shift constants: read once (not per step), before anything slow, and only when the
    # scheme uses them (a hub model's scheduler config is a download).
    shift = None
    if config.train.timestep_sampling == "resolution_shift":
        found = model_shift(hook, trainer, config.model)
        shift = found.constants
        console.print(found.describe())

    # ---- where to start: a run is never overwritten, --resume never restarts silently (run_folder)
    how = Path(resume) if isinstance(resume, (str, Path)) else bool(resume)
    resume_path = resume_point(output_dir, how, console.print)
    if resume_path is not None and ckpt.verify(resume_path) is not None:
        raise UserError(f"checkpoint {resume_path} is unusable: {ckpt.verify(resume_path)}")
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None and state.position.processes != accelerator.num_processes:
        raise UserError(f"checkpoint {resume_path} was written by a run of {state.position.processes} process(es); "
                        f"this one has {accelerator.num_processes}: its data position would not match. Resume "
                        "with the same process count (or start a new output.dir)")
    changes: list[Change] = []
    if state is not None:
        check_same_config(resume_path, state.position.config_fingerprint, config)
        if remaining_work(output_dir, resume_path, state.position.step, config.train.max_steps) is Remaining.NOTHING:
            console.print(nothing_to_do(output_dir, state.position.step, config.train.max_steps))
            return TrainResult(output_dir=output_dir, lora_path=output_dir / LORA_FILE if is_main else None,
                               steps=state.position.step, resumed_from=resume_path)
        changes = resume_changes(resume_path, state.optimizer, state.lr_scheduler, config, config_fingerprint)
        if changes:
            console.print(describe_changes(changes, state.position.step))

    set_seed(config.train.seed, device_specific=False)  # model init in plugins that use the global RNG

    # ---- data
    records = open_records(config.data)
    train_records, holdout_records = split_holdout(records, config.data.holdout)

    # ---- encode first (or read the cache), so encoders and transformer need not share memory
    encoders = LazyEncoders(hook, trainer, config, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    cache, context = open_cache(config, registry, console) if config.cache.enabled else (None, None)
    with console.status("encoding the dataset"):
        if cache is not None and world > 1:  # each rank fills its share of the cache, then all read it whole
            fill_cache((train_records + holdout_records)[rank::world], hook, trainer, encoders, config, cache,
                       context)
            accelerator.wait_for_everyone()
            cache, context = open_cache(config, registry, console)  # re-read the index the others appended to
        train_set = prepare_samples(train_records, hook, trainer, encoders, config, cache, context)
        holdout_set = encode_records(holdout_records, hook, trainer, encoders, config, cache, context)

    # Before the transformer is loaded: validation sampling keeps the encoders, on CPU (the sample hook moves
    # them to the device while it runs); otherwise they are dropped.
    sampling_on = config.validation.every > 0 and bool(config.validation.samples or
                                                       (config.validation.from_holdout and holdout_records))
    validation_cases = []
    if sampling_on:
        from qflux.training.validation import cases_from_config

        holdout_samples = [load_sample(r, config.data, trainer.condition_sizing) for r in holdout_records]
        validation_cases = cases_from_config(config, holdout_samples, trainer.condition_sizing)
        encoders.offload()
    else:
        encoders.release()

    # ---- models
    dtype = torch_dtype(config.model)
    transformer = hook.qflux_load_transformer(trainer=trainer, model=config.model)
    if transformer is None:
        raise UserError(f"no installed plugin loads the transformer for trainer '{trainer.name}'")
    if config.model.quantize:
        transformer = hook.qflux_quantize(transformer=transformer, method=config.model.quantize, model=config.model)
    if config.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = attach_lora(transformer, config.model.lora)

    console.print(f"{len(train_set)} training samples, {len(holdout_set)} held out, "
                  f"{sum(p.numel() for p in params):,} LoRA parameters")

    # ---- optimisation state
    optimizer = build_optimizer(params, config.train)
    lr_scheduler = build_lr_scheduler(optimizer, config.train)
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        load_lora_state(transformer, state.lora)
        fresh = hyperparameters(optimizer)  # the restored state dicts bring the old lr / weight_decay back:
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
        apply_hyperparameters(optimizer, lr_scheduler, fresh)  # the new config's, at the restored step
        step, epoch, batch_in_epoch = state.position.step, state.position.epoch, state.position.batch_in_epoch
        console.print(f"resumed from {resume_path} at step {step}")
    start_step = step

    sharded = config.train.fsdp and world > 1
    if sharded:
        report = shard_frozen_base(transformer, params, accelerator.device)
        console.print(f"train.fsdp: frozen base sharded over {world} processes in {report.units} units: "
                      f"{report.local_params:,} of {report.total_params:,} base parameters on each "
                      f"({report.fraction:.0%}); LoRA replicated")
        optimizer = accelerator.prepare(optimizer)  # not the model: accelerate would wrap it in DDP
    else:
        if config.train.fsdp:
            console.print("train.fsdp: one process, nothing to shard")
        elif world > 1:
            console.print(f"DDP over {world} processes: each holds the whole base (train.fsdp: true shards it)")
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    # accelerate puts autocast into the forward of a model it prepares (kept by unwrap_model); a sharded model
    # is not prepared, so validation enters it explicitly (training does in micro_step)
    validation_autocast = accelerator.autocast if sharded else contextlib.nullcontext
    grad_sync = (lambda ps: all_reduce_mean(ps, world)) if sharded else None
    # every process has judged output.dir (run_folder) before the main one writes into it
    accelerator.wait_for_everyone()
    if is_main:  # only now: a run that fails while loading leaves no output folder behind
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    device = accelerator.device
    sampler = BucketBatchSampler(signatures_of(train_set), config.train.batch_size * world,
                                 config.train.seed)
    holdout_batches = [collate([s]).to(device, dtype) for s in holdout_set[rank::world]]
    # With a sharded base every forward is a collective: ranks with one held-out sample fewer run one batch
    # more (the first sample again, not counted), so that all run the same number of forwards.
    holdout_padding = []
    if sharded and holdout_set and len(holdout_set) % world:
        holdout_padding = [collate([holdout_set[0]]).to(device, dtype)] * (
            -(-len(holdout_set) // world) - len(holdout_batches))
    result = TrainResult(output_dir=output_dir, lora_path=None, steps=step, resumed_from=resume_path)
    metrics = MetricsLog(output_dir) if is_main else None
    if metrics and state is not None:  # one row per resume: config.yaml holds the new values, this says from when
        metrics.log(step, resumed_from=str(resume_path), changed={c.key: [c.old, c.new] for c in changes})

    def evaluate() -> float | None:
        if not holdout_set:
            return None
        model = accelerator.unwrap_model(transformer)  # no DDP collective: ranks may hold no held-out sample
        model.eval()
        with validation_autocast():
            total, count = validation_loss_sum(hook, trainer, model, holdout_batches, config, config.validation.seed)
            if holdout_padding:
                validation_loss_sum(hook, trainer, model, holdout_padding, config, config.validation.seed)
        model.train()
        if world > 1:
            summed = accelerator.reduce(torch.tensor([total, float(count)], device=device), reduction="sum")
            total, count = float(summed[0]), int(summed[1])
        return total / count

    def sample_validation(at_step: int) -> dict[str, float]:
        """Each rank renders its share of the cases on the unwrapped model (no collective inside), then one
        gather brings them to the main process: no rank can wait on another mid-sampling. The main process
        measures their edit fidelity (``val_fidelity``) and returns the means (other ranks: an empty dict).

        With a sharded base every forward is a collective and cases may differ in forward count (sizes,
        true CFG), so every rank renders every case in the same order and the main process keeps them."""
        if not sampling_on:
            return {}
        from accelerate.utils import gather_object

        from qflux.training.val_fidelity import describe, measure_case, summarize
        from qflux.training.validation import grid, render, save_grid

        transformer.eval()
        bundle = ModelBundle(trainer=trainer, model=config.model, transformer=accelerator.unwrap_model(transformer),
                             encoders=encoders.get())
        mine = list(range(len(validation_cases)))
        if not sharded:
            mine = mine[rank::world]
        with validation_autocast():
            rendered = list(zip(mine, render(hook, bundle, [validation_cases[i] for i in mine])))
        transformer.train()
        if world > 1 and not sharded:
            rendered = gather_object(rendered)
        if is_main:
            images = [image for _, image in sorted(rendered, key=lambda pair: pair[0])]
            fidelity = [measure_case(c.request.controls, c.target, c.mask, im)
                        for c, im in zip(validation_cases, images)]
            means = summarize(fidelity)
            if means:
                metrics.log(at_step, **means, val_fidelity=[f.as_row() for f in fidelity])
            image = grid(validation_cases, images, step=at_step, notes=[describe(f) for f in fidelity])
            path = save_grid(output_dir, at_step, image)
            metrics.image("validation", image, at_step)
            console.print(f"step {at_step}: validation samples -> {path}")
            return means
        return {}

    best = BestSelector(config.validation.select_best, output_dir) if is_main and config.validation.select_best \
        else None

    def offer_best(at_step: int, values: dict[str, float | None]) -> None:
        """Export this step's LoRA to output.dir/best when it is the best so far on validation.select_best."""
        if best is None:
            return

        def export_best(directory: Path) -> Path:  # the same file as the final export, of this step
            from qflux.data.trained_sizes import sizes_metadata

            return export_lora(accelerator.unwrap_model(transformer), trainer, config.model.lora, directory,
                               extra_metadata=sizes_metadata(config.data))

        found = best.offer(at_step, values, export_best)
        if found is not None:
            console.print(f"step {at_step}: best {found.metric} so far ({found.value:.5g}) -> {best.directory}")


    def save(position: ckpt.TrainingPosition) -> Path | None:
        path = None
        if is_main:
            from qflux.data.trained_sizes import sizes_metadata  # a checkpoint samples at the trained sizes too

            path = ckpt.save_checkpoint(output_dir, position, lora_state_dict(accelerator.unwrap_model(transformer)),
                                        optimizer, lr_scheduler, config.train.keep_checkpoints,
                                        lora_metadata={**checkpoint_lora_metadata(config.model.lora),
                                                       **sizes_metadata(config.data)})
        accelerator.wait_for_everyone()
        return path

    result.val_loss_start = evaluate()
    if result.val_loss_start is not None:
        console.print(f"held-out validation loss at step {step}: {result.val_loss_start:.5f}")
        if metrics:
            metrics.log(step, val_loss=result.val_loss_start)
    if step == 0 and config.validation.every:
        sample_validation(0)

    transformer.train()
    max_steps = config.train.max_steps
    started = time.perf_counter()
    micro_loss: list[float] = []
    # The state at the last optimizer step: what a checkpoint records (an interrupted gradient accumulation
    # is replayed on resume, so a resumed run equals an uninterrupted one).
    boundary = ckpt.TrainingPosition(step, epoch, batch_in_epoch, fingerprint, world)
    interrupt = InterruptFlag()
    try:
        with TrainProgress(console, total=max_steps, start=step, enabled=is_main) as progress:
            while step < max_steps:
                epoch_batches = rank_batches(sampler, epoch, rank, world)
                while batch_in_epoch < len(epoch_batches) and step < max_steps:
                    mine = epoch_batches[batch_in_epoch]
                    batch_in_epoch += 1
                    batch, generators = make_batch([train_set[i] for i in mine.indices], config, epoch, device, dtype)
                    value = micro_step(accelerator, hook, trainer, transformer, batch, config, generators, params,
                                       optimizer, grad_sync, mine.loss_scale, shift)
                    if not math.isfinite(value):
                        kept = ckpt.latest_valid(output_dir, console.print)
                        raise TrainingStopped(
                            f"loss is {value} at step {step + 1} (samples {', '.join(batch.keys)}): training "
                            f"diverged. Last good checkpoint: {kept or 'none'}. Lower train.lr, set "
                            "train.max_grad_norm, or check these samples; then resume with --resume.")
                    micro_loss.append(value)
                    if not accelerator.sync_gradients:
                        continue
                    lr_scheduler.step()
                    step += 1
                    step_loss = sum(micro_loss) / len(micro_loss)
                    micro_loss.clear()
                    epoch_done = batch_in_epoch >= len(epoch_batches)
                    boundary = ckpt.TrainingPosition(step, epoch + 1 if epoch_done else epoch,
                                                     0 if epoch_done else batch_in_epoch, fingerprint, world)
                    result.losses.append(step_loss)
                    lr = lr_scheduler.get_last_lr()[0]
                    progress.update(step, step_loss, lr)
                    if metrics and step % config.train.log_every == 0:
                        metrics.log(step, loss=step_loss, lr=lr, elapsed=round(time.perf_counter() - started, 3))
                    if config.validation.every and step % config.validation.every == 0 and step < max_steps:
                        val = evaluate()
                        if metrics and val is not None:
                            metrics.log(step, val_loss=val)
                        offer_best(step, {"val_loss": val, **sample_validation(step)})
                    if config.train.save_every and step % config.train.save_every == 0 and step < max_steps:
                        save(boundary)
                    if interrupt.agreed(accelerator):  # Ctrl-C takes effect here, between optimizer steps
                        raise KeyboardInterrupt
                if batch_in_epoch >= len(epoch_batches):
                    epoch, batch_in_epoch = epoch + 1, 0
    except KeyboardInterrupt:
        if boundary.step > start_step:
            path = save(boundary)
            console.print(f"interrupted: checkpoint of step {boundary.step} written to {path}; "
                          "continue with: qflux train --config ... --resume")
        else:
            console.print(f"interrupted before the first optimizer step after step {start_step}; nothing to save")
        if metrics:
            metrics.close()
        raise
    finally:
        interrupt.restore()

    result.steps = step
    result.lora = lora_state_dict(accelerator.unwrap_model(transformer))
    fidelity_end: dict[str, float] = {}
    result.val_loss_end = evaluate()
    if result.val_loss_end is not None:
        console.print(f"held-out validation loss at step {step}: {result.val_loss_end:.5f}")
    if config.validation.every and step > start_step:  # a resume that only exports rendered them already
        fidelity_end = sample_validation(step)
    if config.train.save_every:
        save(boundary)
    if is_main:
        if result.val_loss_end is not None:
            metrics.log(step, val_loss=result.val_loss_end)
        if config.validation.every and step > start_step:
            offer_best(step, {"val_loss": result.val_loss_end, **fidelity_end})
        from qflux.data.trained_sizes import sizes_metadata  # qflux sample plans from the sizes trained with

        result.lora_path = export_lora(accelerator.unwrap_model(transformer), trainer, config.model.lora, output_dir,
                                       extra_metadata=sizes_metadata(config.data))
        metrics.close()
        plot_loss(metrics.path, output_dir / "loss.png")
        plot_fidelity(metrics.path, output_dir / "fidelity.png")
        console.print(f"LoRA written to {result.lora_path}")
    accelerator.wait_for_everyone()
    return result

