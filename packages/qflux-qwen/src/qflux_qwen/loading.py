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

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qflux.errors import UserError
from qflux.model_source import is_tiny, resolve_source, torch_dtype
from qflux_qwen.tiny import TINY_ID
from qflux_qwen.variants import QwenVariant

if TYPE_CHECKING:  # pragma: no cover
    from qflux.config.schema import ModelConfig
    from qflux_qwen.encoders import QwenEncoders

log = logging.getLogger(__name__)

LAYOUT = "a Qwen-Image-Edit diffusers folder has transformer/, vae/, text_encoder/, tokenizer/, processor/ and scheduler/"

# component -> (config files (first found is read), key, accepted values, what it should be)
CONFIG_CHECKS: dict[str, tuple[tuple[str, ...], str | None, tuple[str, ...], str]] = {
    "transformer": (("config.json",), "_class_name", ("QwenImageTransformer2DModel",), "QwenImageTransformer2DModel"),
    "vae": (("config.json",), "_class_name", ("AutoencoderKLQwenImage",), "AutoencoderKLQwenImage"),
    "text_encoder": (("config.json",), "model_type", ("qwen2_5_vl",), "a Qwen2.5-VL model"),
    "scheduler": (
        ("scheduler_config.json",),
        "_class_name",
        ("FlowMatchEulerDiscreteScheduler",),
        "FlowMatchEulerDiscreteScheduler",
    ),
    "tokenizer": (("tokenizer_config.json", "tokenizer.json", "vocab.json"), None, (), "a Qwen2 tokenizer"),
    "processor": (("processor_config.json", "preprocessor_config.json"), None, (), "a Qwen2-VL processor"),
}
ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "processor", "scheduler")


def _config_file(source: str, component: str, names: tuple[str, ...], revision: str | None) -> Path:
    if os.path.isdir(source):
        for name in names:
            if (Path(source) / component / name).is_file():
                return Path(source) / component / name
        raise UserError(
            f"model.pretrained '{source}' is missing the component '{component}' ({component}/{names[0]} not "
            f"found); {LAYOUT}"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for name in names:
        try:
            return Path(hf_hub_download(source, name, subfolder=component, revision=revision))
        except (OSError, ValueError) as err:  # huggingface_hub's errors derive from these
            errors.append(f"{type(err).__name__}: {err}")
    raise UserError(
        f"model.pretrained '{source}': cannot read {component}/{names[0]} from the hub "
        f"(revision {revision or 'main'}): {errors[0]}"
    )


def _read_json(source: str, file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{source}': {file.name} is not valid JSON: {err}") from err


def _model_index(source: str, revision: str | None) -> Path | None:
    if os.path.isdir(source):
        index = Path(source) / "model_index.json"
        return index if index.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, "model_index.json", revision=revision))
    except (OSError, ValueError):  # no index (or no access): the component checks say what is wrong
        return None


def check_family(source: str, variant: QwenVariant, revision: str | None = None) -> None:
    """``model_index.json`` (when there is one) must name a Qwen-Image pipeline (another one is a warning)."""
    index = _model_index(source, revision)
    if index is None:
        return
    pipeline = _read_json(source, index).get("_class_name", "")
    if pipeline and not pipeline.startswith("QwenImage"):
        raise UserError(
            f"model.pretrained '{source}' is a {pipeline} folder, not Qwen-Image (model_index.json); the "
            f"{variant.name} trainer needs a {variant.pipeline_class_name} folder such as {variant.default_model}"
        )
    if pipeline and pipeline != variant.pipeline_class_name:
        log.warning(
            "model.pretrained '%s' is a %s folder; the %s trainer expects %s",
            source, pipeline, variant.name, variant.pipeline_class_name,
        )


def check_components(source: str, components: tuple[str, ...], variant: QwenVariant, revision: str | None = None) -> None:
    """Raise ``UserError`` when ``source`` is another family, lacks one of ``components`` or has one of another
    model. Reads only the small config files."""
    check_family(source, variant, revision)
    for component in components:
        names, key, accepted, expected = CONFIG_CHECKS[component]
        file = _config_file(source, component, names, revision)
        if key is None:
            continue
        found = _read_json(source, file).get(key)
        if found not in accepted:
            raise UserError(
                f"model.pretrained '{source}' is not a Qwen-Image-Edit model: {component}/{file.name} has "
                f"{key} {found!r}, expected {expected}"
            )


def _frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        torch.nn.Module.to(module, dtype)
    return module.eval().requires_grad_(False)


def _loading(source: str, component: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{source}': cannot load {component}: {err}") from err


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
        check_components(source, ("transformer",), variant, model.revision)
        overrides = {"zero_cond_t": True} if variant.zero_cond_t else {}
        transformer = _loading(
            source,
            "transformer",
            lambda: QwenImageTransformer2DModel.from_pretrained(
                source, subfolder="transformer", revision=model.revision, torch_dtype=dtype, use_safetensors=True,
                **overrides
            ),
        )
        if transformer.config.zero_cond_t and not variant.zero_cond_t:
            log.warning(
                "model.pretrained '%s' has a zero_cond_t transformer (Qwen-Image-Edit-2511); the %s trainer keeps "
                "it as it is, the qwen-edit-2511 trainer is the one made for it", source, variant.name,
            )
    if variant.zero_cond_t and not getattr(transformer, "zero_cond_t", False):
        enable_zero_cond_t(transformer)
    return _frozen(transformer, dtype)


def load_scheduler_config(variant: QwenVariant, model: ModelConfig) -> dict[str, Any]:
    """The scheduler config (``scheduler/scheduler_config.json``; ``builtin:tiny``: the real models' values)."""
    if is_tiny(model):
        from qflux_qwen.tiny import SCHEDULER_CONFIG

        return dict(SCHEDULER_CONFIG)
    source = resolve_source(model)
    check_components(source, ("scheduler",), variant, model.revision)
    names = CONFIG_CHECKS["scheduler"][0]
    return _read_json(source, _config_file(source, "scheduler", names, model.revision))


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
        check_components(source, ENCODER_COMPONENTS, variant, revision)
        loaders: dict[str, Callable[[], Any]] = {
            "vae": lambda: AutoencoderKLQwenImage.from_pretrained(
                source, subfolder="vae", revision=revision, torch_dtype=dtype, use_safetensors=True
            ),
            "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(
                source, subfolder="text_encoder", revision=revision, dtype=dtype, use_safetensors=True
            ),
            "tokenizer": lambda: Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
            "processor": lambda: Qwen2VLProcessor.from_pretrained(source, subfolder="processor", revision=revision),
            "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(
                source, subfolder="scheduler", revision=revision
            ),
        }
        parts = {name: _loading(source, name, load) for name, load in loaders.items()}
    for name in ("vae", "text_encoder"):
        _frozen(parts[name], dtype)
    return QwenEncoders(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        processor=parts["processor"],
        scheduler_config=dict(parts["scheduler"].config),
        source=source,
        revision=revision,
    )
