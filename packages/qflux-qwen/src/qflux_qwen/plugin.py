"""The Qwen-Image-Edit trainers (``qwen-edit``, ``qwen-edit-plus``, ``qwen-edit-2511``): qflux hook implementations.

This module is the ``qflux`` entry point and stays light: no torch / diffusers / transformers import at module
level (``qflux plugins list`` imports it); each hook imports its heavy module when called. Every stage hook
returns None unless the selected trainer is one of the three (see ``qflux_qwen.variants``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qflux import hookimpl
from qflux.types import TrainerInfo
from qflux_qwen.variants import VARIANTS, variant_of

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

    from qflux.config.schema import ModelConfig
    from qflux.types import Batch, EditSample, EncodedSample, ModelBundle, NoisyInput, SampleRequest


@hookimpl
def qflux_register_trainers(register: Callable[[TrainerInfo], None]) -> None:
    for variant in VARIANTS.values():
        register(variant.info)


@hookimpl
def qflux_load_transformer(trainer: TrainerInfo, model: ModelConfig) -> torch.nn.Module | None:
    variant = variant_of(trainer)
    if variant is None:
        return None
    from qflux_qwen.loading import load_transformer

    return load_transformer(variant, model)


@hookimpl
def qflux_load_encoders(trainer: TrainerInfo, model: ModelConfig) -> Any | None:
    variant = variant_of(trainer)
    if variant is None:
        return None
    from qflux_qwen.loading import load_encoders

    return load_encoders(variant, model)


@hookimpl
def qflux_encode(
    trainer: TrainerInfo, encoders: Any, samples: list[EditSample], model: ModelConfig, empty_prompt: bool
) -> list[EncodedSample] | None:
    variant = variant_of(trainer)
    if variant is None:
        return None
    from qflux_qwen.encoding import encode_samples

    return encode_samples(variant, encoders, samples, model, empty_prompt)


@hookimpl
def qflux_scheduler_config(trainer: TrainerInfo, model: ModelConfig) -> dict[str, Any] | None:
    variant = variant_of(trainer)
    if variant is None:
        return None
    from qflux_qwen.loading import load_scheduler_config

    return load_scheduler_config(variant, model)


@hookimpl
def qflux_predict(
    trainer: TrainerInfo, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput, model: ModelConfig
) -> torch.Tensor | None:
    variant = variant_of(trainer)
    if variant is None:
        return None
    from qflux_qwen.predict import predict

    return predict(variant, transformer, batch, noisy)


@hookimpl
def qflux_sample(bundle: ModelBundle, request: SampleRequest) -> Image | None:
    variant = variant_of(bundle.trainer)
    if variant is None:
        return None
    from qflux_qwen.sampling import sample

    return sample(variant, bundle, request)
