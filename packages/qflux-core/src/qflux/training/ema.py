"""``train.ema``: an exponential moving average of the adapter's weights, kept as the core's own run callback
(``EmaCallback``, registered by ``qflux.plugins.build_registry``), not as code in the step loop.

- ``qflux_on_start``: a fresh run starts without an average; a resumed one reads it back from the checkpoint's
  ``ema.safetensors`` (so a resumed run's average equals an uninterrupted run's, bit for bit).
- ``qflux_on_step``: at each step ``s >= train.ema.start`` that is a multiple of ``train.ema.every``, the
  average follows the weights: the first such step copies them, each later one does
  ``shadow = decay * shadow + (1 - decay) * weights`` (``lerp``, in float32).
- ``qflux_checkpoint_files``: the average goes into every checkpoint as ``ema.safetensors`` (float32, keyed by
  the parameters' names in the transformer).
- ``qflux_eval_weights``: for the purposes in ``train.ema.use_for`` (``validation``: the held-out loss, the
  validation images and the ``best/`` export; ``export``: the final adapter file) the core evaluates the
  average instead of the trained weights, and puts the trained ones back after.

The average is of the weights the optimizer steps (with ``adamw_schedulefree``: its training weights ``y``).
Every process keeps the same average (the adapter is replicated); the main process writes it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qflux.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import EmaConfig
    from qflux.events import CheckpointEvent, EvalEvent, StartEvent, StepEvent

EMA_FILE = "ema.safetensors"  # in each checkpoint folder
STEP_KEY = "qflux.ema_step"  # safetensors metadata: the step of the last update


@dataclass
class ExponentialMovingAverage:
    """The average of a list of parameters (float32 shadows, one per parameter, in their order)."""

    config: EmaConfig
    names: list[str]  # the parameters' names in the transformer: the keys of the checkpoint file
    shadow: list[torch.Tensor] = field(default_factory=list)  # empty until the first update
    step: int = 0  # the step of the last update

    def due(self, step: int) -> bool:
        return step >= self.config.start and step % self.config.every == 0

    def update(self, params: list[torch.nn.Parameter], step: int) -> None:
        import torch

        with torch.no_grad():
            if not self.shadow:
                self.shadow = [p.detach().float().clone() for p in params]
            else:
                for shadow, p in zip(self.shadow, params, strict=True):
                    shadow.lerp_(p.detach().float(), 1.0 - self.config.decay)
        self.step = step

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {name: s.detach().cpu().contiguous() for name, s in zip(self.names, self.shadow)}  # empty: none yet
        return save(tensors, metadata={STEP_KEY: str(self.step)})

    def load(self, path: Any, params: list[torch.nn.Parameter]) -> None:
        """The average saved in ``path`` (a checkpoint's ``ema.safetensors``), onto the parameters' devices."""
        from safetensors import safe_open

        from qflux.errors import UserError

        with safe_open(str(path), "pt") as f:
            keys, metadata = set(f.keys()), f.metadata() or {}
            if keys and keys != set(self.names):  # empty: saved before the first update
                raise UserError(f"{path}: its tensors ({len(keys)}) are not this run's adapter parameters "
                                f"({len(self.names)}); resume with the adapter settings that wrote it")
            self.shadow = [f.get_tensor(name).to(p.device) for name, p in zip(self.names, params, strict=True)
                           ] if keys else []
        self.step = int(metadata.get(STEP_KEY, 0))

    def weights(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [s.to(p.dtype) for s, p in zip(self.shadow, params, strict=True)]


def _names(transformer: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    # torch.compile's wrappers (train.compile) insert "_orig_mod." into the names: left out, so that a
    # checkpoint's average loads whether or not the resumed run compiles
    by_id = {id(p): name.replace("_orig_mod.", "") for name, p in transformer.named_parameters()}
    return [by_id.get(id(p), f"param.{i}") for i, p in enumerate(params)]


class EmaCallback:
    """The run callback: one instance per plugin registry (``qflux.plugins.build_registry`` registers it next to
    the default plugin), holding the average of the run in progress (None: ``train.ema`` is off, or no run
    yet); ``qflux_on_start`` replaces it, so a registry can run one training after another."""

    def __init__(self) -> None:
        self.active: ExponentialMovingAverage | None = None

    @hookimpl
    def qflux_on_start(self, event: StartEvent) -> None:
        config = event.config.train.ema
        self.active = None
        if config is None:
            return
        self.active = ExponentialMovingAverage(config, _names(event.transformer, event.params))
        if event.checkpoint is None:
            return
        saved = event.checkpoint / EMA_FILE
        if saved.is_file():
            self.active.load(saved, event.params)
        elif event.is_main:
            print(f"train.ema: checkpoint {event.checkpoint} holds no {EMA_FILE} (written without train.ema): the "
                  "average starts from the weights of its next update", file=sys.stderr)

    @hookimpl
    def qflux_on_step(self, event: StepEvent) -> None:
        if self.active is not None and self.active.due(event.step):
            self.active.update(event.params, event.step)

    @hookimpl
    def qflux_checkpoint_files(self, event: CheckpointEvent) -> dict[str, bytes] | None:
        if self.active is None:
            return None
        return {EMA_FILE: self.active.to_bytes()}  # before the first update: no tensors, the run's EMA is still on

    @hookimpl
    def qflux_eval_weights(self, event: EvalEvent) -> list[torch.Tensor] | None:
        active = self.active
        if active is None or not active.shadow or event.purpose not in active.config.use_for:
            return None
        return active.weights(event.params)
