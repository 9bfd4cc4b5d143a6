"""The qflux hook specifications: every extension point a plugin can implement.

A plugin is a module (or object) with functions decorated by ``@qflux.hookimpl`` whose names match the
specs below; it is found through the entry-point group ``qflux``. Stage hooks receive the selected
``TrainerInfo`` and return ``None`` when the trainer is not theirs, so several trainer plugins coexist: the
first non-None result wins (``firstresult``). Heavy imports (torch, diffusers) belong inside the hook
bodies, not at plugin import, so that ``qflux plugins list`` stays fast.

Order of calls in one ``qflux train`` run::

    qflux_register_trainers, qflux_register_quantizers    (plugin discovery)
    qflux_load_encoders                                   (skipped when the embedding cache is complete)
    qflux_encode                                          (per chunk of missing samples; results are cached)
    qflux_load_transformer -> qflux_quantize -> (LoRA attached by the core; encoders already off the device)
    qflux_scheduler_config                                (once, with train.timestep_sampling: resolution_shift)
    per step: qflux_predict -> qflux_loss
    per validation: qflux_sample
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

    from qflux.config.schema import LossConfig, ModelConfig
    from qflux.types import (
        Batch,
        EditSample,
        EncodedSample,
        ModelBundle,
        NoisyInput,
        QuantizerInfo,
        SampleRequest,
        TrainerInfo,
    )

hookspec = pluggy.HookspecMarker("qflux")
hookimpl = pluggy.HookimplMarker("qflux")


@hookspec
def qflux_register_trainers(register: Callable[[TrainerInfo], None]) -> None:
    """Register the trainers this plugin provides.

    Args:
        register: call it once per ``TrainerInfo``. A trainer name registered by two plugins is an error
            that names both packages.

    Called once, when the plugin manager is built. Returns nothing.
    """


@hookspec
def qflux_register_quantizers(register: Callable[[QuantizerInfo], None]) -> None:
    """Register the quantization backends this plugin provides.

    Args:
        register: call it once per ``QuantizerInfo``; names must be unique across plugins.

    Called once, when the plugin manager is built. Returns nothing.
    """


@hookspec(firstresult=True)
def qflux_load_transformer(trainer: TrainerInfo, model: ModelConfig) -> torch.nn.Module | None:
    """Load the denoising transformer of ``trainer`` from ``model.pretrained`` in ``model.dtype``.

    Args:
        trainer: the selected trainer; return None when it is not yours.
        model: the ``model`` config section (``pretrained`` is a folder, a hub id or ``builtin:tiny``).

    Returns:
        The transformer (a diffusers ``ModelMixin``), frozen, on CPU, not yet quantized.
    Called once per run before quantization and LoRA; raise ``qflux.errors.UserError`` for a bad folder.
    """


@hookspec(firstresult=True)
def qflux_load_encoders(trainer: TrainerInfo, model: ModelConfig) -> Any | None:
    """Load what ``qflux_encode`` and ``qflux_sample`` need besides the transformer (VAE, text encoders,
    tokenizers, processor), frozen, in ``model.dtype``.

    Args:
        trainer: the selected trainer; return None when it is not yours.
        model: the ``model`` config section.

    Returns:
        A plugin-defined object (None when the trainer is not yours), on CPU. If it has a ``to(device)``
        method returning the moved object, the core moves it to the training device before encoding;
        otherwise the core only passes it back.
    Called lazily: not at all when every sample is in the embedding cache and no sampling is needed.
    """


@hookspec(firstresult=True)
def qflux_quantize(transformer: torch.nn.Module, method: str, model: ModelConfig) -> torch.nn.Module | None:
    """Quantize the frozen ``transformer`` in place or return a replacement.

    Args:
        transformer: the loaded transformer, before LoRA is attached.
        method: the value of ``model.quantize`` (a registered quantizer name); return None if not yours.
        model: the model config (``quantize_skip`` lists module name patterns to keep in full precision).

    Returns:
        The quantized transformer. Called once, after ``qflux_load_transformer``, when ``model.quantize``
        is set.
    """


@hookspec(firstresult=True)
def qflux_encode(
    trainer: TrainerInfo, encoders: Any, samples: list[EditSample], model: ModelConfig, empty_prompt: bool
) -> list[EncodedSample] | None:
    """Encode samples: VAE latents of target and controls (normalised, packed), prompt embeddings, the
    empty-prompt embeddings used for caption dropout and the token-space edit mask.

    Args:
        trainer: the selected trainer; return None when it is not yours.
        encoders: what ``qflux_load_encoders`` returned.
        samples: resized samples (sides multiples of 16), each with a target.
        model: the model config (``max_sequence_length``).
        empty_prompt: also fill ``EncodedSample.empty_prompt`` (caption dropout is on).

    Returns:
        One ``EncodedSample`` per input, in order, tensors on CPU. Called for samples not in the cache.
    """


@hookspec(firstresult=True)
def qflux_scheduler_config(trainer: TrainerInfo, model: ModelConfig) -> dict[str, Any] | None:
    """The model's noise-scheduler config: what ``scheduler/scheduler_config.json`` of its diffusers folder says.

    Args:
        trainer: the selected trainer; return None when it is not yours.
        model: the ``model`` config section (``builtin:tiny``: the config the tiny pipeline is built with; a hub
            id: read with ``model.revision``).

    Returns:
        The config as a dict of ``FlowMatchEulerDiscreteScheduler`` keys; the core reads ``base_shift``,
        ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len`` and ``time_shift_type`` (missing keys take
        diffusers' defaults). Raise ``qflux.errors.UserError`` when it cannot be read.
    Called once per run before the first step, only with ``train.timestep_sampling: resolution_shift``.
    Without an answer the core reads a folder's ``scheduler/scheduler_config.json``, else diffusers' defaults.
    """


@hookspec(firstresult=True)
def qflux_predict(
    trainer: TrainerInfo, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput, model: ModelConfig
) -> torch.Tensor | None:
    """Run the transformer on noisy target tokens plus the clean control tokens and prompt.

    Args:
        trainer: the selected trainer; return None when it is not yours.
        transformer: the (LoRA-wrapped, possibly quantized) transformer.
        batch: the encoded batch on the training device.
        noisy: ``latents`` [B, N, C] at ``sigmas`` [B].
        model: the model config (e.g. ``guidance``).

    Returns:
        The predicted velocity for the target tokens only, [B, N, C]. Called every training step and for
        the validation loss.
    """


@hookspec(firstresult=True)
def qflux_loss(prediction: torch.Tensor, noisy: NoisyInput, batch: Batch, loss: LossConfig) -> torch.Tensor | None:
    """Compute the scalar training loss.

    Args:
        prediction: [B, N, C] from ``qflux_predict``.
        noisy: holds the velocity ``target`` [B, N, C] and ``sigmas`` [B].
        batch: holds the token-space edit ``mask`` [B, N] (or None).
        loss: the ``loss`` config section.

    Returns:
        A scalar tensor. The core's default (flow matching with edit-mask weighting) runs last, so a
        plugin's implementation replaces it; a ``hookwrapper`` can wrap it instead.
    Called every training step after ``qflux_predict`` (and for the validation loss).
    """


@hookspec(firstresult=True)
def qflux_sample(bundle: ModelBundle, request: SampleRequest) -> Image | None:
    """Generate one image with the trainer's diffusers pipeline and the current (LoRA) transformer.

    Args:
        bundle: the transformer and the encoders; ``bundle.trainer`` says which trainer (None if not yours).
        request: prompt, control images, size, steps, seed and guidance.

    Returns:
        A PIL image. Called by validation during training and by ``qflux sample``; the pipeline must use a
        scheduler instance of its own, never the training one.
    """
