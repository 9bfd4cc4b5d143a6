"""The FLUX.2 trainers (``flux2-dev``, ``flux2-klein``): ``Trainer`` objects registered with qflux, one per
variant (``qflux_flux2.variants``).

This module is the ``qflux`` entry point and stays light: no torch / diffusers / transformers import at module
level (``qflux plugins list`` imports it); each stage imports its heavy module when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qflux import hookimpl
from qflux.plugin_api import Trainer
from qflux_flux2.options import Flux2Options
from qflux_flux2.variants import VARIANTS, Flux2Variant

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
        QfluxConfig,
        SampleRequest,
    )


class Flux2Trainer(Trainer):
    """One FLUX.2 variant; the stages read its switches (``Flux2Variant``)."""

    Options = Flux2Options

    def __init__(self, variant: Flux2Variant) -> None:
        self.variant = variant
        super().__init__(variant.info)

    def check(self, config: QfluxConfig) -> None:
        from qflux_flux2.loading import check_not_distilled

        check_not_distilled(self.variant, config.model, self.options(config.model).allow_distilled)

    def load_transformer(self, model: ModelConfig) -> torch.nn.Module:
        from qflux_flux2.loading import load_transformer

        return load_transformer(self.variant, model)

    def load_encoders(self, model: ModelConfig) -> Any:
        from qflux_flux2.loading import load_encoders

        return load_encoders(self.variant, model)

    def encode(self, encoders: Any, samples: list[EditSample], model: ModelConfig,
               empty_prompt: bool) -> list[EncodedSample]:
        from qflux_flux2.encoding import encode_samples

        return encode_samples(self.variant, encoders, samples, model, empty_prompt)

    def scheduler_config(self, model: ModelConfig) -> dict[str, Any]:
        from qflux_flux2.loading import load_scheduler_config

        return load_scheduler_config(self.variant, model)

    def shift_rule(self, model: ModelConfig) -> Any:
        from qflux_flux2.shift import EmpiricalMuShift

        return EmpiricalMuShift(steps=self.options(model).shift_steps)

    def predict(self, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
                model: ModelConfig) -> torch.Tensor:
        from qflux_flux2.predict import predict

        return predict(self.variant, transformer, batch, noisy, self.options(model).guidance)

    def encode_request(self, encoders: Any, request: SampleRequest, model: ModelConfig) -> Any:
        from qflux_flux2.sampling import encode_request

        return encode_request(self.variant, encoders, request, model)

    def decoder(self, encoders: Any, tiling: bool) -> Any:
        from qflux_flux2.sampling import decoder

        return super().decoder(decoder(encoders), tiling)

    def sample(self, bundle: ModelBundle, request: SampleRequest, encoded: Any = None) -> Image:
        from qflux_flux2.sampling import sample

        return sample(self.variant, bundle, request, encoded)


TRAINERS: dict[str, Flux2Trainer] = {name: Flux2Trainer(variant) for name, variant in VARIANTS.items()}


@hookimpl
def qflux_register_trainers(register: Callable[[Trainer], None]) -> None:
    for trainer in TRAINERS.values():
        register(trainer)
