"""Load the FLUX.1 Kontext components from ``builtin:tiny``, a diffusers folder or a hub id.

Before any weights are read, the component configs are checked, so that a folder of another model family
(a Qwen-Image folder, an SDXL folder...) or one missing a component fails with a ``UserError`` naming the
folder and the problem, instead of a random-initialised module or a deep traceback. Remote code is never
trusted, and weights are read only from safetensors files (``use_safetensors=True``: a folder holding only
pickled ``.bin`` weights is refused, never unpickled). The transformer and the encoders are frozen (``requires_grad_(False)``) and in eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qflux.plugin_api import (
    TINY_ID,
    Component,
    ModelFamily,
    check_model,
    frozen,
    guarded_load,
    is_tiny,
    read_component_config,
    resolve_source,
    torch_dtype,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.plugin_api import ModelConfig
    from qflux_kontext.encoders import KontextEncoders

KONTEXT_PIPELINE = "FluxKontextPipeline"
FAMILY = ModelFamily(
    name="FLUX.1 Kontext",
    pipeline=KONTEXT_PIPELINE,
    pipeline_prefix="Flux",
    trainer="kontext",
    layout="a FLUX.1 Kontext diffusers folder has transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
    "tokenizer_2/ and scheduler/",
    components={
        "transformer": Component(accepted=("FluxTransformer2DModel",)),
        "vae": Component(accepted=("AutoencoderKL",)),
        "scheduler": Component(files=("scheduler_config.json",), accepted=("FlowMatchEulerDiscreteScheduler",)),
        "text_encoder": Component(key="model_type", accepted=("clip_text_model", "clip"), expected="a CLIP text model"),
        "text_encoder_2": Component(key="model_type", accepted=("t5",), expected="a T5 encoder"),
        "tokenizer": Component(files=()),  # a folder (local only), read by the tokenizer class
        "tokenizer_2": Component(files=()),
    },
)
ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def load_transformer(model: ModelConfig) -> torch.nn.Module:
    """The frozen ``FluxTransformer2DModel`` in ``model.dtype`` on CPU."""
    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_kontext.tiny import tiny_transformer

        return frozen(tiny_transformer(), dtype)
    from diffusers import FluxTransformer2DModel

    source = resolve_source(model)
    check_model(source, FAMILY, ("transformer",), model.revision)
    transformer = guarded_load(
        FluxTransformer2DModel, source, "transformer", revision=model.revision, torch_dtype=dtype, use_safetensors=True
    )
    return frozen(transformer)


def load_scheduler_config(model: ModelConfig) -> dict[str, Any]:
    """The scheduler config (``scheduler/scheduler_config.json``; ``builtin:tiny``: the real model's values)."""
    if is_tiny(model):
        from qflux_kontext.tiny import SCHEDULER_CONFIG

        return dict(SCHEDULER_CONFIG)
    source = resolve_source(model)
    check_model(source, FAMILY, ("scheduler",), model.revision)
    return read_component_config(source, FAMILY, "scheduler", model.revision)


def load_encoders(model: ModelConfig) -> KontextEncoders:
    """VAE, CLIP and T5 (frozen, eval, ``model.dtype``), their tokenizers and the scheduler config."""
    from qflux_kontext.encoders import KontextEncoders

    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_kontext.tiny import tiny_scheduler, tiny_text_encoders, tiny_vae

        text = tiny_text_encoders()
        parts = {"vae": tiny_vae(), **text}
        source = TINY_ID
        scheduler_config = tiny_scheduler().config
    else:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        source = resolve_source(model)
        rev = model.revision
        check_model(source, FAMILY, ENCODER_COMPONENTS, rev)
        weights = dict(revision=rev, use_safetensors=True)
        parts = {
            "vae": guarded_load(AutoencoderKL, source, "vae", torch_dtype=dtype, **weights),
            "text_encoder": guarded_load(CLIPTextModel, source, "text_encoder", dtype=dtype, **weights),
            "tokenizer": guarded_load(CLIPTokenizer, source, "tokenizer", revision=rev),
            "text_encoder_2": guarded_load(T5EncoderModel, source, "text_encoder_2", dtype=dtype, **weights),
            "tokenizer_2": guarded_load(T5TokenizerFast, source, "tokenizer_2", revision=rev),
        }
        scheduler_config = guarded_load(FlowMatchEulerDiscreteScheduler, source, "scheduler", revision=rev).config
    for name in ("vae", "text_encoder", "text_encoder_2"):
        frozen(parts[name], dtype)
    return KontextEncoders(
        scheduler_config=dict(scheduler_config),
        max_sequence_length=min(512, int(parts["tokenizer_2"].model_max_length)),
        source=source,
        **parts,
    )
