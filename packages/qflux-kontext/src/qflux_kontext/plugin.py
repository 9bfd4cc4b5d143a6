"""The ``kontext`` trainer (FLUX.1 Kontext): qflux hook implementations.

This module is the ``qflux`` entry point and stays light: no torch / diffusers / transformers import at module
level (``qflux plugins list`` imports it); each hook imports its heavy module when called. Every stage hook
returns None unless the selected trainer is ``kontext``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qflux import hookimpl
from qflux.types import ConditionSizing, TrainerInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

    from qflux.config.schema import ModelConfig
    from qflux.types import Batch, EditSample, EncodedSample, ModelBundle, NoisyInput, SampleRequest

NAME = "kontext"

# diffusers.pipelines.flux.pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS, (w, h): the pipeline snaps a
# control to the entry of closest aspect (``_auto_resize``, its default). Copied, not imported, so that this
# module stays light; a test compares it with diffusers' list and with what the pipeline really picks.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
# The pipeline takes the aspect after flooring the image's sides to vae_scale_factor * 2 = 16.
CONDITION_SIZING = ConditionSizing(preferred=PREFERRED_KONTEXT_RESOLUTIONS, multiple=16, input_multiple=16)

TRAINER = TrainerInfo(
    name=NAME,
    family="flux-kontext",
    description="FLUX.1 Kontext image editing (FluxTransformer2DModel; CLIP + T5 prompts; up to 3 controls)",
    pipeline="diffusers.FluxKontextPipeline",
    default_model="black-forest-labs/FLUX.1-Kontext-dev",
    max_controls=3,
    condition_sizing=CONDITION_SIZING,
)


def _mine(trainer: TrainerInfo | None) -> bool:
    return trainer is not None and trainer.name == NAME


@hookimpl
def qflux_register_trainers(register: Callable[[TrainerInfo], None]) -> None:
    register(TRAINER)


@hookimpl
def qflux_load_transformer(trainer: TrainerInfo, model: ModelConfig) -> torch.nn.Module | None:
    if not _mine(trainer):
        return None
    from qflux_kontext.loading import load_transformer

    return load_transformer(model)


@hookimpl
def qflux_load_encoders(trainer: TrainerInfo, model: ModelConfig) -> Any | None:
    if not _mine(trainer):
        return None
    from qflux_kontext.loading import load_encoders

    return load_encoders(model)


@hookimpl
def qflux_encode(
    trainer: TrainerInfo, encoders: Any, samples: list[EditSample], model: ModelConfig, empty_prompt: bool
) -> list[EncodedSample] | None:
    if not _mine(trainer):
        return None
    from qflux_kontext.encoding import encode_samples

    return encode_samples(encoders, samples, model, empty_prompt)


@hookimpl
def qflux_scheduler_config(trainer: TrainerInfo, model: ModelConfig) -> dict[str, Any] | None:
    if not _mine(trainer):
        return None
    from qflux_kontext.loading import load_scheduler_config

    return load_scheduler_config(model)


@hookimpl
def qflux_predict(
    trainer: TrainerInfo, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput, model: ModelConfig
) -> torch.Tensor | None:
    if not _mine(trainer):
        return None
    from qflux_kontext.predict import predict

    return predict(transformer, batch, noisy, model)


@hookimpl
def qflux_sample(bundle: ModelBundle, request: SampleRequest) -> Image | None:
    if not _mine(bundle.trainer):
        return None
    from qflux_kontext.sampling import sample

    return sample(bundle, request)
