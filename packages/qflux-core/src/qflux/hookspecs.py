"""The qflux hook specifications: discovery and the true 1:N extension points.

A plugin is a module (or object) with functions decorated by ``@qflux.hookimpl`` whose names match the
specs below; it is found through the entry-point group ``qflux``. pluggy does what it is made for here:
discovery (the registration hooks hand the core ``Trainer``, ``Quantizer`` and ``Adapter`` objects, whose
methods the core then calls for the selected one, see ``qflux.trainer``), hooks several plugins contribute
to or wrap (the loss), and run callbacks every plugin hears (an EMA, an experiment tracker). The stages of
a model (load, encode, predict, sample) are methods of its ``Trainer``, not hooks: no plugin guards a hook
by trainer name and no call can go unanswered. Heavy imports (torch, diffusers) belong inside hook bodies,
not at plugin import, so that ``qflux plugins list`` stays fast.

Order of calls in one ``qflux train`` run (the exact, tested order: docs/plugins.md, "Call order")::

    qflux_register_trainers, qflux_register_quantizers, qflux_register_adapters   (plugin discovery)
    preflight: Adapter.check, Trainer.check, Quantizer.check
    start: Trainer.shift_rule / scheduler_config (resolution_shift only)
    encode: Trainer.load_encoders, Trainer.encode (samples missing from the cache)
    models: Trainer.load_transformer -> Quantizer.quantize -> Adapter.attach (-> Adapter.load_state) -> qflux_on_start
    per step: Trainer.predict -> qflux_loss -> (optimizer step) -> qflux_on_step
    per validation: qflux_eval_weights -> (held-out loss, images) -> qflux_on_validation
    per checkpoint: qflux_checkpoint_files -> (written) -> qflux_on_checkpoint
    at the end: qflux_eval_weights -> (export) -> qflux_on_export
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.adapters.base import Adapter
    from qflux.config.schema import LossConfig
    from qflux.events import CheckpointEvent, EvalEvent, ExportEvent, StartEvent, StepEvent, ValidationEvent
    from qflux.quantizer import Quantizer
    from qflux.trainer import Trainer
    from qflux.types import Batch, NoisyInput

hookspec = pluggy.HookspecMarker("qflux")
hookimpl = pluggy.HookimplMarker("qflux")


@hookspec
def qflux_register_trainers(register: Callable[[Trainer], None]) -> None:
    """Register the trainers this plugin provides.

    Args:
        register: call it once per ``Trainer`` instance (a subclass of ``qflux.trainer.Trainer``). A trainer
            name registered by two plugins is an error that names both packages.

    Called once, when the plugin manager is built. Returns nothing.
    """


@hookspec
def qflux_register_quantizers(register: Callable[[Quantizer], None]) -> None:
    """Register the quantization backends this plugin provides.

    Args:
        register: call it once per ``Quantizer`` instance (``qflux.quantizer``); names must be unique across
            plugins.

    Called once, when the plugin manager is built. Returns nothing.
    """


@hookspec(firstresult=True)
def qflux_loss(prediction: torch.Tensor, noisy: NoisyInput, batch: Batch, loss: LossConfig) -> torch.Tensor | None:
    """Compute the scalar training loss.

    Args:
        prediction: [B, N, C] from ``Trainer.predict`` (one call per control layout of a mixed batch, the rows
            in batch order).
        noisy: holds the velocity ``target`` [B, N, C] and ``sigmas`` [B].
        batch: holds the token-space edit ``mask`` [B, N] (or None); a mixed batch keeps its controls in
            ``sample_controls`` (``controls`` is empty).
        loss: the ``loss`` config section.

    Returns:
        A scalar tensor. The core's default (flow matching with edit-mask weighting) runs last, so a
        plugin's implementation replaces it; a wrapper (``@hookimpl(wrapper=True)``) can wrap it instead.
    Called every training step after ``Trainer.predict`` (and for the validation loss).
    """




@hookspec
def qflux_register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register the adapter kinds this plugin provides (selected by ``model.adapter``).

    Args:
        register: call it once per ``Adapter`` instance (``qflux.adapters.base``); names must be unique.

    Called once, when the plugin manager is built. Returns nothing. The core registers ``lora`` itself.
    """


@hookspec
def qflux_on_start(event: StartEvent) -> None:
    """A run callback: the run is ready to train (models, adapter, optimizer; a resumed run's state loaded).

    Args:
        event: the step it starts from, the checkpoint folder resumed from (None for a fresh run), the
            (unwrapped) transformer, the adapter and its trainable parameters, the config, whether this process
            is the main one.

    Called on every process once per ``train`` call that trains or exports, after the run folder exists and
    before the first validation, every plugin in turn (1:N). Returns nothing. A callback that keeps state
    across a resume reads it back here from the files it added to the checkpoint (``qflux_checkpoint_files``).
    """


@hookspec(firstresult=True)
def qflux_eval_weights(event: EvalEvent) -> list[torch.Tensor] | None:
    """Weights to evaluate the adapter with instead of the trained ones (an average of them, for example).

    Args:
        event: the step, the ``purpose`` (``"validation"``: the held-out loss, the validation images and the
            ``best/`` export; ``"export"``: the final adapter file), the (unwrapped) transformer, the adapter,
            its trainable parameters (holding the weights that would be evaluated), the config, ``is_main``.

    Returns:
        One tensor per ``event.params`` (same shapes), or None to evaluate the trained weights. The first
        plugin that returns tensors decides. The core copies them into the parameters for the evaluation and
        puts the trained values back, bit for bit, after it.
    Called before each held-out loss and each round of validation images (every process) and before each
    export (the main process, which writes it).
    """


@hookspec
def qflux_checkpoint_files(event: CheckpointEvent) -> dict[str, bytes] | None:
    """Files a run callback adds to a checkpoint (its state, so that a resumed run continues it).

    Args:
        event: the step and the checkpoint folder about to be written, the config.

    Returns:
        ``{file name: contents}`` (or None): written into the checkpoint with the core's files, atomically and
        listed in its manifest (so verified on resume). A name the core or another plugin uses is an error.
    Called on the main process (the one that writes) before each checkpoint is written, every plugin in turn
    (1:N, the dicts merged).
    """


@hookspec
def qflux_on_step(event: StepEvent) -> None:
    """A run callback: an optimizer step finished.

    Args:
        event: the step number, its loss and learning rate, the (unwrapped) transformer, the adapter and its
            trainable parameters, the run config, and whether this process is the main one.

    Called on every process after each optimizer step, every plugin in turn (1:N). Returns nothing.
    """


@hookspec
def qflux_on_validation(event: ValidationEvent) -> None:
    """A run callback: validation ran (held-out loss and, when configured, sample images).

    Args:
        event: the step, the held-out loss (None without held-out samples), the fidelity means, the config.

    Called on every process after each validation, every plugin in turn (1:N). Returns nothing.
    """


@hookspec
def qflux_on_checkpoint(event: CheckpointEvent) -> None:
    """A run callback: a checkpoint was written.

    Args:
        event: the step and the checkpoint folder (None on processes that do not write).

    Called on every process after each checkpoint, every plugin in turn (1:N). Returns nothing.
    """


@hookspec
def qflux_on_export(event: ExportEvent) -> None:
    """A run callback: the final adapter file was written.

    Args:
        event: the step and the exported file (None on processes that do not write).

    Called on every process once at the end of the run, every plugin in turn (1:N). Returns nothing.
    """
