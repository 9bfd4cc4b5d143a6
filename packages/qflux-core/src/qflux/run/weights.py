"""Which weights the adapter holds while the run evaluates it (held-out loss, validation images, exports).

The trained weights, except:

- a schedule-free optimizer (``adamw_schedulefree``) trains at one point (``y``) and is evaluated at another
  (``x``, its average): around an evaluation its own ``optimizer.eval()`` switch puts ``x`` into the parameters
  and ``optimizer.train()`` switches back;
- a run callback may hand the core other weights for the evaluation (``qflux_eval_weights``: ``train.ema``'s
  average), copied into the parameters for it.

After the evaluation the trained weights are put back **bit for bit** from a copy taken before: ``eval()``
then ``train()`` is a ``lerp`` there and back, which rounds, and a run resumed from a checkpoint must continue
exactly as the uninterrupted run did, whatever validations either made. So checkpoints hold the training
weights (schedule-free: ``y``, with the optimizer's state in train mode: exact resume) and exports the
evaluated ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from qflux.errors import PluginError
from qflux.events import EvalEvent
from qflux.run.context import Run
from qflux.training.optim import has_eval_mode


class EvalWeights:
    def __init__(self, run: Run, transformer: torch.nn.Module, optimizer: Any) -> None:
        self.run, self.transformer, self.optimizer = run, transformer, optimizer
        # the adapter's trainable parameters, in the optimizer's order (what qflux_on_step's event.params holds)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.switch = has_eval_mode(optimizer)
        self._inside = False

    def train_mode(self) -> None:
        """The optimizer in train mode (schedule-free starts in eval mode, and refuses to step there)."""
        if self.switch:
            self.optimizer.train()

    @contextmanager
    def evaluating(self, purpose: str, step: int) -> Iterator[None]:
        """The block runs with the weights to evaluate for ``purpose`` (``validation`` or ``export``)."""
        if self._inside:  # an export inside a validation block: the weights are in place already
            yield
            return
        run, params = self.run, self.params
        live = [p.detach().clone() for p in params] if self.switch else None
        if self.switch:
            self.optimizer.eval()
        model = run.unwrap(self.transformer)
        event = EvalEvent(step, purpose, model, run.selection.adapter, params, run.config, run.is_main)
        weights = run.hook.qflux_eval_weights(event=event)
        if weights is not None:
            if len(weights) != len(params) or any(w.shape != p.shape for w, p in zip(weights, params)):
                raise PluginError(f"qflux_eval_weights returned {len(weights)} tensors of shapes "
                                  f"{[tuple(w.shape) for w in weights][:3]}...; the adapter has {len(params)} "
                                  "parameters: return one tensor per event.params, of its shape")
            if live is None:
                live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w)
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
            if self.switch:
                self.optimizer.train()
            if live is not None:
                with torch.no_grad():
                    for p, value in zip(params, live):
                        p.copy_(value)
