"""``Image21Trainer``: the ``qwen-image-2.1`` stages (each imports its heavy module when called)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qflux.plugin_api import Trainer
from qflux_qwen.image21.info import INFO

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


class Image21Trainer(Trainer):
    """Qwen-Image 2.1 image-conditioned generation (see ``qflux_qwen.image21``)."""

    info = INFO

    def check(self, config: QfluxConfig) -> None:
        """Before any work: a diffusers without Qwen-Image 2.1 (qflux-qwen's other trainers run on 0.38), and
        target sizes the model cannot take (``data.resolution`` given as sizes that are not multiples of 32; a
        budget's sizes depend on each image's aspect and are checked when encoded)."""
        from qflux.plugin_api import ConfigError, UserError
        from qflux_qwen.image21.info import SIDE_MULTIPLE

        try:
            from diffusers import QwenImage21Pipeline  # noqa: F401
        except ImportError as err:
            import diffusers

            raise UserError(f"the qwen-image-2.1 trainer needs diffusers >= 0.42 (QwenImage21Pipeline; installed: "
                            f"{diffusers.__version__}): pip install -U 'diffusers>=0.42'") from err
        spec = config.data.resolution_spec
        if spec.mode != "budget":
            bad = [f"{h}x{w}" for h, w in spec.sizes if h % SIDE_MULTIPLE or w % SIDE_MULTIPLE]
            if bad:
                raise ConfigError(f"data.resolution: {', '.join(bad)} (h x w): Qwen-Image 2.1 needs sides that are "
                                  f"multiples of {SIDE_MULTIPLE} (one vision slot covers 2 x 2 tokens of 16 px)")

    def load_transformer(self, model: ModelConfig) -> torch.nn.Module:
        from qflux_qwen.image21.loading import load_transformer

        return load_transformer(model)

    def load_encoders(self, model: ModelConfig) -> Any:
        from qflux_qwen.image21.loading import load_encoders

        return load_encoders(model)

    def encode(self, encoders: Any, samples: list[EditSample], model: ModelConfig,
               empty_prompt: bool) -> list[EncodedSample]:
        from qflux_qwen.image21.encoding import encode_samples

        return encode_samples(encoders, samples, model, empty_prompt)

    def scheduler_config(self, model: ModelConfig) -> dict[str, Any]:
        from qflux_qwen.image21.loading import load_scheduler_config

        return load_scheduler_config(model)

    def predict(self, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput,
                model: ModelConfig) -> torch.Tensor:
        from qflux_qwen.image21.predict import predict

        return predict(transformer, batch, noisy)

    def encode_request(self, encoders: Any, request: SampleRequest, model: ModelConfig) -> Any:
        from qflux_qwen.image21.sampling import encode_request

        return encode_request(encoders, request, model)

    def decoder(self, encoders: Any, tiling: bool) -> Any:
        from qflux_qwen.image21.sampling import decoder

        return super().decoder(decoder(encoders), tiling)

    def sample(self, bundle: ModelBundle, request: SampleRequest, encoded: Any = None) -> Image:
        from qflux_qwen.image21.sampling import sample

        return sample(bundle, request, encoded)
