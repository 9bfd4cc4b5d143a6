"""The ``kontext`` trainer (FLUX.1 Kontext): a ``Trainer`` registered with qflux.

This module is the ``qflux`` entry point and stays light: no torch / diffusers / transformers import at module
level (``qflux plugins list`` imports it); each stage imports its heavy module when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qflux import hookimpl
from qflux.plugin_api import ConditionSizing, MemoryProfile, Trainer, TrainerInfo
from qflux_kontext.options import KontextOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

    from qflux.plugin_api import Batch, EditSample, EncodedSample, ModelBundle, ModelConfig, NoisyInput, SampleRequest

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

INFO = TrainerInfo(
    name=NAME,
    family="flux-kontext",
    description="FLUX.1 Kontext image editing (FluxTransformer2DModel; CLIP + T5 prompts; up to 3 controls)",
    pipeline="diffusers.FluxKontextPipeline",
    default_model="black-forest-labs/FLUX.1-Kontext-dev",
    max_controls=3,
    condition_sizing=CONDITION_SIZING,
    # measured: benchmarks/calibrate_activations.py (builtin:tiny, LoRA on the default targets)
    memory=MemoryProfile(activations=(("FluxTransformerBlock", 12.7), ("FluxSingleTransformerBlock", 12.3)),
                         half=(("FluxTransformerBlock", 22.0), ("FluxSingleTransformerBlock", 19.5)),
                         text_tokens=512),
)


class KontextTrainer(Trainer):
    info = INFO
    Options = KontextOptions

    def load_transformer(self, model: ModelConfig) -> torch.nn.Module:
        from qflux_kontext.loading import load_transformer

        return load_transformer(model)

    def load_encoders(self, model: ModelConfig) -> Any:
        from qflux_kontext.loading import load_encoders

        return load_encoders(model)

    def encode(self, encoders: Any, samples: list[EditSample], model: ModelConfig,
               empty_prompt: bool) -> list[EncodedSample]:
        from qflux_kontext.encoding import encode_samples

        return encode_samples(encoders, samples, model, empty_prompt)

    def scheduler_config(self, model: ModelConfig) -> dict[str, Any]:
        from qflux_kontext.loading import load_scheduler_config

        return load_scheduler_config(model)

    def predict(self, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
                model: ModelConfig) -> torch.Tensor:
        from qflux_kontext.predict import predict

        return predict(transformer, batch, noisy, self.options(model).guidance)

    def encode_request(self, encoders: Any, request: SampleRequest, model: ModelConfig) -> Any:
        from qflux_kontext.sampling import encode_request

        return encode_request(encoders, request, model)

    def decoder(self, encoders: Any, tiling: bool) -> Any:
        from qflux_kontext.sampling import decoder

        return super().decoder(decoder(encoders), tiling)

    def sample(self, bundle: ModelBundle, request: SampleRequest, encoded: Any = None) -> Image:
        from qflux_kontext.sampling import sample

        return sample(bundle, request, encoded=encoded)  # request.guidance None: model.options.sample_guidance


TRAINER = KontextTrainer()


@hookimpl
def qflux_register_trainers(register: Callable[[Trainer], None]) -> None:
    register(TRAINER)
