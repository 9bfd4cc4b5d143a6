"""The Qwen trainers: the Qwen-Image-Edit ones (``qwen-edit``, ``qwen-edit-plus``, ``qwen-edit-2511``), one
``QwenTrainer`` per variant (``qflux_qwen.variants``), and ``qwen-image-2.1`` (``qflux_qwen.image21``).

This module is the ``qflux`` entry point and stays light: no torch / diffusers / transformers import at module
level (``qflux plugins list`` imports it); each stage imports its heavy module when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qflux import hookimpl
from qflux.plugin_api import Trainer
from qflux_qwen.image21.trainer import Image21Trainer
from qflux_qwen.variants import VARIANTS, QwenVariant

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

    from qflux.plugin_api import (
        Batch,
        EditSample,
        EncodedSample,
        ModelBundle,
        ModelConfig,
        NoisyInput,
        SampleRequest,
    )


class QwenTrainer(Trainer):
    """One Qwen-Image-Edit variant; the stages read its switches (``QwenVariant``)."""

    def __init__(self, variant: QwenVariant) -> None:
        self.variant = variant
        super().__init__(variant.info)

    def load_transformer(self, model: ModelConfig) -> torch.nn.Module:
        from qflux_qwen.loading import load_transformer

        return load_transformer(self.variant, model)

    def load_encoders(self, model: ModelConfig) -> Any:
        from qflux_qwen.loading import load_encoders

        return load_encoders(self.variant, model)

    def encode(self, encoders: Any, samples: list[EditSample], model: ModelConfig,
               empty_prompt: bool) -> list[EncodedSample]:
        from qflux_qwen.encoding import encode_samples

        return encode_samples(self.variant, encoders, samples, model, empty_prompt)

    def scheduler_config(self, model: ModelConfig) -> dict[str, Any]:
        from qflux_qwen.loading import load_scheduler_config

        return load_scheduler_config(self.variant, model)

    def predict(self, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
                model: ModelConfig) -> torch.Tensor:
        from qflux_qwen.predict import predict

        return predict(self.variant, transformer, batch, noisy)

    def encode_request(self, encoders: Any, request: SampleRequest, model: ModelConfig) -> Any:
        from qflux_qwen.sampling import encode_request

        return encode_request(self.variant, encoders, request, model)

    def decoder(self, encoders: Any, tiling: bool) -> Any:
        from qflux_qwen.sampling import decoder

        return super().decoder(decoder(encoders), tiling)

    def sample(self, bundle: ModelBundle, request: SampleRequest, encoded: Any = None) -> Image:
        from qflux_qwen.sampling import sample

        return sample(self.variant, bundle, request, encoded)


TRAINERS: dict[str, Trainer] = {name: QwenTrainer(variant) for name, variant in VARIANTS.items()}
TRAINERS["qwen-image-2.1"] = Image21Trainer()


@hookimpl
def qflux_register_trainers(register: Callable[[Trainer], None]) -> None:
    for trainer in TRAINERS.values():
        register(trainer)
