"""Load the Qwen-Image 2.1 components from ``builtin:tiny``, a diffusers folder or a hub id.

As for the Qwen-Image-Edit trainers (``qflux_qwen.loading``): the component configs are checked before any weights
are read (another family's folder is refused by name), ``model.revision`` goes to every hub read, remote code is
never trusted, and modules come back frozen, in eval mode, in ``model.dtype``, on CPU. The pipeline's own config
(``sample_sigmas`` in ``model_index.json``: the author's sampling grid) is kept for sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qflux.plugin_api import (
    TINY_ID,
    Component,
    ModelFamily,
    UserError,
    check_model,
    device_of,
    frozen,
    guarded_load,
    is_tiny,
    read_component_config,
    resolve_source,
    torch_dtype,
)
from qflux_qwen.image21.info import DEFAULT_MODEL, NAME

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.plugin_api import ModelConfig

FAMILY = ModelFamily(
    name="Qwen-Image 2.1",
    pipeline="QwenImage21Pipeline",
    pipeline_prefix="QwenImage21",
    layout="a Qwen-Image 2.1 diffusers folder has transformer/, vae/, text_encoder/, processor/ and scheduler/",
    components={
        "transformer": Component(accepted=("QwenImage21Transformer2DModel",)),
        "vae": Component(accepted=("AutoencoderKLQwenImage21",)),
        "text_encoder": Component(key="model_type", accepted=("qwen3_vl",), expected="a Qwen3-VL model"),
        "scheduler": Component(files=("scheduler_config.json",), accepted=("FlowMatchEulerDiscreteScheduler",)),
        "processor": Component(files=("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"),
                               key=None),
    },
    trainer=NAME,
    example=DEFAULT_MODEL,
)
ENCODER_COMPONENTS = ("vae", "text_encoder", "processor", "scheduler")


@dataclass
class Image21Encoders:
    """Everything besides the transformer that encoding and sampling need; modules frozen, in eval mode.
    ``scheduler_config``: sampling builds a fresh ``FlowMatchEulerDiscreteScheduler`` from it for every call;
    ``sample_sigmas``: the pipeline config's sampling grid (None: ``linspace(1, 1/steps)``)."""

    vae: Any
    text_encoder: Any
    processor: Any
    scheduler_config: dict[str, Any]
    sample_sigmas: list[float] | None = None
    source: str = ""
    revision: str | None = None

    @property
    def device(self) -> torch.device:
        return device_of(self.vae)

    def to(self, device: Any) -> Image21Encoders:
        """Move the VAE and the text encoder to ``device`` (in place); returns self."""
        self.vae.to(device)
        if self.text_encoder is not None:  # Trainer.decoder's copy has none
            self.text_encoder.to(device)
        return self

    def pipeline(self, transformer: Any = None, scheduler: Any = None) -> Any:
        """A ``QwenImage21Pipeline`` sharing these modules (nothing is copied), for its helpers or for sampling."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

        return QwenImage21Pipeline(
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae, text_encoder=self.text_encoder, processor=self.processor, transformer=transformer,
            sample_sigmas=self.sample_sigmas,
        )


def load_transformer(model: ModelConfig) -> torch.nn.Module:
    """The frozen ``QwenImage21Transformer2DModel`` in ``model.dtype`` on CPU."""
    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_qwen.image21.tiny import tiny_transformer

        return frozen(tiny_transformer(), dtype)
    from diffusers import QwenImage21Transformer2DModel

    source = resolve_source(model)
    check_model(source, FAMILY, ("transformer",), model.revision)
    transformer = guarded_load(QwenImage21Transformer2DModel, source, "transformer", revision=model.revision,
                               torch_dtype=dtype, use_safetensors=True)
    return frozen(transformer, dtype)


def load_scheduler_config(model: ModelConfig) -> dict[str, Any]:
    if is_tiny(model):
        from qflux_qwen.image21.tiny import SCHEDULER_CONFIG

        return dict(SCHEDULER_CONFIG)
    source = resolve_source(model)
    check_model(source, FAMILY, ("scheduler",), model.revision)
    return read_component_config(source, FAMILY, "scheduler", model.revision)


def _sample_sigmas(source: str, revision: str | None) -> list[float] | None:
    import json
    from pathlib import Path

    path = Path(source).expanduser() / "model_index.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "model_index.json", revision=revision))
        return json.loads(path.read_text(encoding="utf-8")).get("sample_sigmas")
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{source}': model_index.json is not readable: {err}") from err


def load_encoders(model: ModelConfig) -> Image21Encoders:
    """VAE and Qwen3-VL (frozen, eval, ``model.dtype``), the processor and the scheduler config."""
    dtype = torch_dtype(model)
    sigmas = None
    if is_tiny(model):
        from qflux_qwen.image21.tiny import tiny_encoder_parts

        parts = tiny_encoder_parts()
        source, revision = TINY_ID, None
    else:
        from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

        source, revision = resolve_source(model), model.revision
        check_model(source, FAMILY, ENCODER_COMPONENTS, revision)
        weights = dict(revision=revision, use_safetensors=True)
        parts = {
            "vae": guarded_load(AutoencoderKLQwenImage21, source, "vae", torch_dtype=dtype, **weights),
            "text_encoder": guarded_load(Qwen3VLForConditionalGeneration, source, "text_encoder", dtype=dtype,
                                         **weights),
            "processor": guarded_load(Qwen3VLProcessor, source, "processor", revision=revision),
            "scheduler": guarded_load(FlowMatchEulerDiscreteScheduler, source, "scheduler", revision=revision),
        }
        sigmas = _sample_sigmas(source, revision)
    for name in ("vae", "text_encoder"):
        frozen(parts[name], dtype)
    return Image21Encoders(vae=parts["vae"], text_encoder=parts["text_encoder"], processor=parts["processor"],
                           scheduler_config=dict(parts["scheduler"].config), sample_sigmas=sigmas, source=source,
                           revision=revision)
