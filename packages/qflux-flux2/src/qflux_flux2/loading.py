"""Load the FLUX.2 components from ``builtin:tiny``, a diffusers folder or a hub id.

Before any weights are read, the component configs are checked, so that a folder of another model family (a
FLUX.1 folder, a Qwen folder...) or one missing a component fails with a ``UserError`` naming the folder and the
problem, instead of a random-initialised module or a deep traceback. ``model.revision`` is passed to every hub
read; remote code is never trusted. Modules come back frozen (``requires_grad_(False)``), in eval mode, in
``model.dtype``, on CPU.

FLUX.2 [klein] exists as base checkpoints (``FLUX.2-klein-base-4B`` / ``-9B``) and as step-distilled ones
(``model_index.json``: ``"is_distilled": true``, sampled in 4 steps without CFG). A LoRA trained on a
step-distilled model fights the distillation (the training target is the flow of the undistilled teacher), so
``check`` refuses such a folder unless ``model.options.allow_distilled`` is set. 4B and 9B differ only in sizes,
which come from the folder's configs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflux.plugin_api import (
    TINY_ID,
    Component,
    ModelFamily,
    UserError,
    check_model,
    frozen,
    guarded_load,
    is_tiny,
    read_component_config,
    resolve_source,
    torch_dtype,
)
from qflux_flux2.variants import Flux2Variant

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.plugin_api import ModelConfig
    from qflux_flux2.encoders import Flux2Encoders

log = logging.getLogger(__name__)

TEXT_ENCODERS = {"flux2-dev": ("mistral3", "a Mistral3 model"), "flux2-klein": ("qwen3", "a Qwen3 model")}


def family_of(variant: Flux2Variant) -> ModelFamily:
    """The folder table of ``variant``: its components, pipeline and names."""
    model_type, expected = TEXT_ENCODERS[variant.name]
    return ModelFamily(
        name="FLUX.2",
        pipeline=variant.pipeline_class_name,
        pipeline_prefix="Flux2",
        layout="a FLUX.2 diffusers folder has transformer/, vae/, text_encoder/, tokenizer/ and scheduler/",
        components={
            "transformer": Component(accepted=("Flux2Transformer2DModel",)),
            "vae": Component(accepted=("AutoencoderKLFlux2",)),
            "text_encoder": Component(key="model_type", accepted=(model_type,), expected=expected),
            "scheduler": Component(files=("scheduler_config.json",), accepted=("FlowMatchEulerDiscreteScheduler",)),
            "tokenizer": Component(files=("tokenizer_config.json", "tokenizer.json"), key=None),
        },
        trainer=variant.name,
        example=variant.default_model,
    )


ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def model_index(model: ModelConfig) -> dict[str, Any]:
    """The folder's ``model_index.json`` (a hub id: downloaded); {} for ``builtin:tiny`` or when unreadable."""
    if is_tiny(model):
        return {}
    source = resolve_source(model)
    path = Path(source).expanduser() / "model_index.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "model_index.json", revision=model.revision))
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - the component checks report a bad folder more precisely
        log.debug("model_index.json of %s not read: %s", source, err)
        return {}


def check_not_distilled(variant: Flux2Variant, model: ModelConfig, allow: bool) -> None:
    """``UserError`` for a step-distilled [klein] checkpoint unless ``allow`` (see the module docstring)."""
    if allow or not model_index(model).get("is_distilled", False):
        return
    raise UserError(
        f"model.pretrained '{model.pretrained}' is a step-distilled FLUX.2 [klein] checkpoint (is_distilled in "
        f"model_index.json); train on the base checkpoint (e.g. black-forest-labs/FLUX.2-klein-base-4B), or set "
        f"model.options.allow_distilled: true to train it anyway"
    )


def load_transformer(variant: Flux2Variant, model: ModelConfig) -> torch.nn.Module:
    """The frozen ``Flux2Transformer2DModel`` in ``model.dtype`` on CPU."""
    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_flux2.tiny import tiny_transformer

        transformer = tiny_transformer(variant)
    else:
        from diffusers import Flux2Transformer2DModel

        source = resolve_source(model)
        check_model(source, family_of(variant), ("transformer",), model.revision)
        transformer = guarded_load(Flux2Transformer2DModel, source, "transformer", revision=model.revision,
                                   torch_dtype=dtype, use_safetensors=True)
    if bool(transformer.config.guidance_embeds) != variant.guidance_embeds:
        other = "flux2-dev" if transformer.config.guidance_embeds else "flux2-klein"
        raise UserError(
            f"model.pretrained '{model.pretrained}' has a transformer "
            f"{'with' if transformer.config.guidance_embeds else 'without'} a guidance embedding: it is a "
            f"{other} model, not a {variant.name} one (use --trainer {other})"
        )
    return frozen(transformer, dtype)


def load_scheduler_config(variant: Flux2Variant, model: ModelConfig) -> dict[str, Any]:
    """The scheduler config (``scheduler/scheduler_config.json``; ``builtin:tiny``: FLUX.2's values)."""
    if is_tiny(model):
        from qflux_flux2.tiny import SCHEDULER_CONFIG

        return dict(SCHEDULER_CONFIG)
    source = resolve_source(model)
    family = family_of(variant)
    check_model(source, family, ("scheduler",), model.revision)
    return read_component_config(source, family, "scheduler", model.revision)


def load_encoders(variant: Flux2Variant, model: ModelConfig) -> Flux2Encoders:
    """VAE and text encoder (frozen, eval, ``model.dtype``), tokenizer / processor and the scheduler config."""
    from qflux_flux2.encoders import Flux2Encoders

    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_flux2.tiny import tiny_encoder_parts

        parts = tiny_encoder_parts(variant)
        source, revision = TINY_ID, None
    else:
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        source, revision = resolve_source(model), model.revision
        check_model(source, family_of(variant), ENCODER_COMPONENTS, revision)
        weights = dict(revision=revision, use_safetensors=True)
        if variant.name == "flux2-dev":
            from transformers import AutoProcessor, Mistral3ForConditionalGeneration

            text_class, tokenizer_class = Mistral3ForConditionalGeneration, AutoProcessor
        else:
            from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

            text_class, tokenizer_class = Qwen3ForCausalLM, Qwen2TokenizerFast
        parts = {
            "vae": guarded_load(AutoencoderKLFlux2, source, "vae", torch_dtype=dtype, **weights),
            "text_encoder": guarded_load(text_class, source, "text_encoder", dtype=dtype, **weights),
            "tokenizer": guarded_load(tokenizer_class, source, "tokenizer", revision=revision),
            "scheduler": guarded_load(FlowMatchEulerDiscreteScheduler, source, "scheduler", revision=revision),
        }
    for name in ("vae", "text_encoder"):
        frozen(parts[name], dtype)
    return Flux2Encoders(
        variant=variant,
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_config=dict(parts["scheduler"].config),
        source=source,
        revision=revision,
    )



def fresh_scheduler(config: dict[str, Any]) -> Any:
    """A new ``FlowMatchEulerDiscreteScheduler`` from the model's scheduler config (never the training one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)
