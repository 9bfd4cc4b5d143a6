"""Validation during a run: the held-out loss (every process, its share), the sample images (rendered by
each process, gathered on the main one, measured for edit fidelity) and the best-step export; each with the
weights to evaluate (``qflux.run.weights``: schedule-free's evaluation weights, ``train.ema``'s average)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.events import ValidationEvent
from qflux.run.context import Run
from qflux.run.encode import EncodedData
from qflux.run.weights import EvalWeights
from qflux.training.batching import collate
from qflux.training.metrics import MetricsLog
from qflux.training.step import validation_loss_sum
from qflux.training.strategy import Strategy
from qflux.types import ModelBundle


class Validator:
    def __init__(self, run: Run, strategy: Strategy, data: EncodedData, metrics: MetricsLog | None) -> None:
        from qflux.training.best import BestSelector

        self.run, self.strategy, self.data, self.metrics = run, strategy, data, metrics
        holdout = data.holdout_set
        self.batches = [collate([s]).to(run.device, run.dtype) for s in holdout[run.rank::run.world]]
        self.padding = [collate([holdout[0]]).to(run.device, run.dtype)] * strategy.holdout_padding(
            holdout, len(self.batches)) if holdout else []
        select = run.config.validation.select_best
        self.best = BestSelector(select, run.output_dir) if run.is_main and select else None
        self.base: tuple[list[Any], dict[str, float]] | None = None  # step 0's images and means: the base model's
        self.weights = EvalWeights(run, strategy.transformer, strategy.optimizer)

    def evaluate(self, at_step: int) -> float | None:
        """The held-out loss at fixed sigmas and noise, averaged over every process's share."""
        run, config = self.run, self.run.config
        if not self.data.holdout_set:
            return None
        model = run.unwrap(self.strategy.transformer)  # no DDP collective: ranks may hold no held-out sample
        model.eval()
        with self.weights.evaluating("validation", at_step), self.strategy.validation_autocast():
            total, count = validation_loss_sum(run.hook, run.trainer, model, self.batches, config,
                                               config.validation.seed)
            if self.padding:
                validation_loss_sum(run.hook, run.trainer, model, self.padding, config, config.validation.seed)
        model.train()
        if run.world > 1:
            summed = run.accelerator.reduce(torch.tensor([total, float(count)], device=run.device), reduction="sum")
            total, count = float(summed[0]), int(summed[1])
        return total / count

    def sample(self, at_step: int) -> dict[str, float]:
        """Each rank renders its share of the cases on the unwrapped model (no collective inside), then one
        gather brings them to the main process: no rank can wait on another mid-sampling. The main process
        measures their edit fidelity (``val_fidelity``) and returns the means (other ranks: an empty dict).

        With a sharded base every forward is a collective and cases may differ in forward count (sizes,
        true CFG), so every rank renders every case in the same order and the main process keeps them."""
        if not self.data.sampling_on:
            return {}
        from accelerate.utils import gather_object

        from qflux.training.validation import render

        run, cases, transformer = self.run, self.data.validation_cases, self.strategy.transformer
        mine = list(range(len(cases)))
        if not self.strategy.sharded:
            mine = mine[run.rank::run.world]
        transformer.eval()
        with self.weights.evaluating("validation", at_step):
            bundle = ModelBundle(trainer=run.trainer, model=run.config.model, transformer=run.unwrap(transformer),
                                 encoders=self.data.sampling_encoders())  # the decoder of pre-encoded cases
            with self.strategy.validation_autocast():
                rendered = list(zip(mine, render(bundle, [cases[i] for i in mine])))
        transformer.train()
        if run.world > 1 and not self.strategy.sharded:
            rendered = gather_object(rendered)
        if not run.is_main:
            return {}
        return self._report(at_step, [image for _, image in sorted(rendered, key=lambda pair: pair[0])])

    def _report(self, at_step: int, images: list[Any]) -> dict[str, float]:
        from qflux.training.val_fidelity import describe, measure_case, score_note, summarize
        from qflux.training.validation import grid, save_grid

        cases = self.data.validation_cases
        fidelity = [measure_case(c.request.controls, c.target, c.mask, im) for c, im in zip(cases, images)]
        means = summarize(fidelity)
        if means:
            self.metrics.log(at_step, **means, val_fidelity=[f.as_row() for f in fidelity])
        if at_step == 0:  # the untrained LoRA: these are the base model's samples, shown beside the later ones
            self.base = images, means
        image = grid(cases, images, step=at_step, notes=[describe(f) for f in fidelity],
                     base=self.base[0] if self.base and at_step else None)
        path = save_grid(self.run.output_dir, at_step, image)
        self.metrics.image("validation", image, at_step)
        self.run.console.print(f"step {at_step}: validation samples -> {path}"
                               + score_note(means, self.base[1] if self.base and at_step else None))
        return means

    def validate(self, at_step: int) -> None:
        """A validation step mid-run: the held-out loss, the images, the best-step export, the callbacks."""
        val = self.evaluate(at_step)
        if self.metrics and val is not None:
            self.metrics.log(at_step, val_loss=val)
        fidelity = self.sample(at_step)
        self.offer_best(at_step, {"val_loss": val, **fidelity})
        self.announce(at_step, val, fidelity)

    def announce(self, at_step: int, val: float | None, fidelity: dict[str, float]) -> None:
        run = self.run
        run.hook.qflux_on_validation(event=ValidationEvent(at_step, val, run.config, run.is_main, fidelity))

    def offer_best(self, at_step: int, values: dict[str, float | None]) -> None:
        """Export this step's adapter to output.dir/best when it is the best so far on validation.select_best."""
        if self.best is None:
            return
        found = self.best.offer(at_step, values, lambda directory: self.export(directory, "validation", at_step))
        if found is not None:
            self.run.console.print(f"step {at_step}: best {found.metric} so far ({found.value:.5g}) -> "
                                   f"{self.best.directory}")

    def export(self, directory: Path, purpose: str, at_step: int) -> Path:
        """The adapter file for use outside qflux (the final export: ``purpose`` "export"; best/: "validation"),
        of the weights to evaluate. Its digest is of the trained weights (what a checkpoint of this step
        holds): ``training.run_folder`` matches an export to its checkpoint by it."""
        from qflux.adapters.base import STATE_DIGEST, state_digest
        from qflux.data.trained_sizes import sizes_metadata  # qflux sample plans from the sizes trained with

        run = self.run
        adapter, model = run.selection.adapter, run.unwrap(self.strategy.transformer)
        extra = {**sizes_metadata(run.config.data), STATE_DIGEST: state_digest(adapter.state_dict(model))}
        with self.weights.evaluating(purpose, at_step):
            return adapter.export(model, run.trainer, run.selection.adapter_options(run.config), directory,
                                  extra_metadata=extra)
