"""Load the Qwen-Image-Edit components from ``builtin:tiny``, a diffusers folder or a hub id.

Before any weights are read, the component configs are checked, so that a folder of another model family
(a FLUX folder, an SDXL folder...) or one missing a component fails with a ``UserError`` naming the folder
and the problem, instead of a random-initialised module or a deep traceback. ``model.revision`` is passed to
every hub read; remote code is never trusted. The transformer and the encoders are frozen
(``requires_grad_(False)``), in eval mode, in ``model.dtype``, on CPU.

``qwen-edit-2511``: the transformer is loaded with ``zero_cond_t=True`` whatever its config says (the real
2511 config already has it), so its control tokens are modulated with the embedding of t = 0.
"""

from __future__ import annotations

import dataclasses
import logging
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
from qflux_qwen.variants import QwenVariant

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.plugin_api import ModelConfig
    from qflux_qwen.encoders import QwenEncoders

log = logging.getLogger(__name__)

MODEL_FAMILY = ModelFamily(
    name="Qwen-Image-Edit",
    pipeline="QwenImageEditPipeline",
    pipeline_prefix="QwenImage",
    layout="a Qwen-Image-Edit diffusers folder has transformer/, vae/, text_encoder/, tokenizer/, processor/ and "
    "scheduler/",
    components={
        "transformer": Component(accepted=("QwenImageTransformer2DModel",)),
        "vae": Component(accepted=("AutoencoderKLQwenImage",)),
        "text_encoder": Component(key="model_type", accepted=("qwen2_5_vl",), expected="a Qwen2.5-VL model"),
        "scheduler": Component(files=("scheduler_config.json",), accepted=("FlowMatchEulerDiscreteScheduler",)),
        "tokenizer": Component(files=("tokenizer_config.json", "tokenizer.json", "vocab.json"), key=None),
        "processor": Component(files=("processor_config.json", "preprocessor_config.json"), key=None),
    },
)
ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "processor", "scheduler")


def family_of(variant: QwenVariant) -> ModelFamily:
    """The folder table of ``variant``: the family's components, the variant's pipeline and names."""
    return dataclasses.replace(
        MODEL_FAMILY, pipeline=variant.pipeline_class_name, trainer=variant.name, example=variant.default_model
    )


MIN_DIFFUSERS = "0.38"


def check_diffusers() -> None:
    """``UserError`` unless the installed diffusers has what the Qwen trainers rely on. 0.37 brought the
    transformer's ``zero_cond_t`` (Qwen-Image-Edit-2511) and the text length taken from
    ``encoder_hidden_states_mask``: on 0.36 training crashes deep in the transformer's RoPE (qflux passes no
    ``txt_seq_lens``) and ``zero_cond_t`` would be set as a plain attribute the model ignores, so the signature
    is checked (a development build's version string says little). 0.38 lets the plus pipeline encode a prompt
    without an image (a sample without control: KeyError 'pixel_values' on 0.37)."""
    import inspect

    import diffusers
    from diffusers import QwenImageTransformer2DModel
    from packaging.version import InvalidVersion, Version

    installed = diffusers.__version__
    if "zero_cond_t" not in inspect.signature(QwenImageTransformer2DModel.__init__).parameters:
        missing = "QwenImageTransformer2DModel has no zero_cond_t"
    else:
        try:
            too_old = Version(installed).release < Version(MIN_DIFFUSERS).release
        except InvalidVersion:
            too_old = False
        if not too_old:
            return
        missing = "its Qwen-Image-Edit-Plus pipeline cannot encode a prompt without an image"
    raise UserError(f"the Qwen trainers need diffusers >= {MIN_DIFFUSERS} ({missing} in the installed diffusers "
                    f"{installed}): pip install -U 'diffusers>={MIN_DIFFUSERS}'")


def enable_zero_cond_t(transformer: torch.nn.Module) -> torch.nn.Module:
    """Switch a ``QwenImageTransformer2DModel`` to ``zero_cond_t`` (condition tokens at t = 0) in place: the flag
    lives on the model and on each block and adds no weights; the config records it (``save_pretrained``)."""
    transformer.zero_cond_t = True
    for block in transformer.transformer_blocks:
        block.zero_cond_t = True
    transformer.register_to_config(zero_cond_t=True)
    return transformer


def load_transformer(variant: QwenVariant, model: ModelConfig) -> torch.nn.Module:
    """The frozen ``QwenImageTransformer2DModel`` in ``model.dtype`` on CPU (``zero_cond_t`` on for 2511)."""
    check_diffusers()
    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_qwen.tiny import tiny_transformer

        transformer = tiny_transformer(variant)
    else:
        from diffusers import QwenImageTransformer2DModel

        source = resolve_source(model)
        check_model(source, family_of(variant), ("transformer",), model.revision)
        overrides = {"zero_cond_t": True} if variant.zero_cond_t else {}
        transformer = guarded_load(
            QwenImageTransformer2DModel,
            source,
            "transformer",
            revision=model.revision,
            torch_dtype=dtype,
            use_safetensors=True,
            **overrides,
        )
        if transformer.config.zero_cond_t and not variant.zero_cond_t:
            log.warning(
                "model.pretrained '%s' has a zero_cond_t transformer (Qwen-Image-Edit-2511); the %s trainer keeps "
                "it as it is, the qwen-edit-2511 trainer is the one made for it", source, variant.name,
            )
    if variant.zero_cond_t and not getattr(transformer, "zero_cond_t", False):
        enable_zero_cond_t(transformer)
    return frozen(transformer, dtype)


def load_scheduler_config(variant: QwenVariant, model: ModelConfig) -> dict[str, Any]:
    """The scheduler config (``scheduler/scheduler_config.json``; ``builtin:tiny``: the real models' values)."""
    if is_tiny(model):
        from qflux_qwen.tiny import SCHEDULER_CONFIG

        return dict(SCHEDULER_CONFIG)
    source = resolve_source(model)
    family = family_of(variant)
    check_model(source, family, ("scheduler",), model.revision)
    return read_component_config(source, family, "scheduler", model.revision)


def load_encoders(variant: QwenVariant, model: ModelConfig) -> QwenEncoders:
    """VAE and Qwen2.5-VL (frozen, eval, ``model.dtype``), tokenizer, processor and the scheduler config."""
    from qflux_qwen.encoders import QwenEncoders

    check_diffusers()  # before the long encode: the transformer loaded after it would refuse anyway
    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_qwen.tiny import tiny_encoder_parts

        parts = tiny_encoder_parts()
        source, revision = TINY_ID, None
    else:
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

        source, revision = resolve_source(model), model.revision
        check_model(source, family_of(variant), ENCODER_COMPONENTS, revision)
        weights = dict(revision=revision, use_safetensors=True)
        parts = {
            "vae": guarded_load(AutoencoderKLQwenImage, source, "vae", torch_dtype=dtype, **weights),
            "text_encoder": guarded_load(
                Qwen2_5_VLForConditionalGeneration, source, "text_encoder", dtype=dtype, **weights
            ),
            "tokenizer": guarded_load(Qwen2Tokenizer, source, "tokenizer", revision=revision),
            "processor": guarded_load(Qwen2VLProcessor, source, "processor", revision=revision),
            "scheduler": guarded_load(FlowMatchEulerDiscreteScheduler, source, "scheduler", revision=revision),
        }
    for name in ("vae", "text_encoder"):
        frozen(parts[name], dtype)
    return QwenEncoders(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        processor=parts["processor"],
        scheduler_config=dict(parts["scheduler"].config),
        source=source,
        revision=revision,
    )
