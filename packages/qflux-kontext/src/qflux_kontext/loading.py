"""Load the FLUX.1 Kontext components from ``builtin:tiny``, a diffusers folder or a hub id.

Before any weights are read, the component configs are checked, so that a folder of another model family
(a Qwen-Image folder, an SDXL folder...) or one missing a component fails with a ``UserError`` naming the
folder and the problem, instead of a random-initialised module or a deep traceback. Remote code is never
trusted, and weights are read only from safetensors files (``use_safetensors=True``: a folder holding only
pickled ``.bin`` weights is refused, never unpickled). The transformer and the encoders are frozen (``requires_grad_(False)``) and in eval mode.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qflux.errors import UserError
from qflux.model_source import is_tiny, resolve_source, torch_dtype
from qflux_kontext.tiny import TINY_ID

if TYPE_CHECKING:  # pragma: no cover
    from qflux.config.schema import ModelConfig
    from qflux_kontext.encoders import KontextEncoders

log = logging.getLogger(__name__)

# component -> (config file, key, accepted values, what it should be)
CONFIG_CHECKS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "transformer": ("config.json", "_class_name", ("FluxTransformer2DModel",), "FluxTransformer2DModel"),
    "vae": ("config.json", "_class_name", ("AutoencoderKL",), "AutoencoderKL"),
    "scheduler": (
        "scheduler_config.json",
        "_class_name",
        ("FlowMatchEulerDiscreteScheduler",),
        "FlowMatchEulerDiscreteScheduler",
    ),
    "text_encoder": ("config.json", "model_type", ("clip_text_model", "clip"), "a CLIP text model"),
    "text_encoder_2": ("config.json", "model_type", ("t5",), "a T5 encoder"),
}
TOKENIZERS = ("tokenizer", "tokenizer_2")
KONTEXT_PIPELINE = "FluxKontextPipeline"


def _read_config(source: str, component: str, filename: str, revision: str | None) -> dict[str, Any]:
    if os.path.isdir(source):
        file = Path(source) / component / filename
        if not file.is_file():
            raise UserError(
                f"model.pretrained '{source}' is missing the component '{component}' ({component}/{filename} "
                f"not found); a FLUX.1 Kontext diffusers folder has transformer/, vae/, text_encoder/, "
                f"text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/"
            )
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(source, filename, subfolder=component, revision=revision))
        except (OSError, ValueError) as err:
            raise UserError(
                f"model.pretrained '{source}': cannot read {component}/{filename} from the hub "
                f"(revision {revision or 'main'}): {type(err).__name__}: {err}; check the connection and that "
                f"your token (HF_TOKEN or `hf auth login`) has access to the repo, or download it "
                f"(`hf download {source} --local-dir DIR`) and set model.pretrained to DIR"
            ) from err
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{source}': {component}/{filename} is not valid JSON: {err}") from err


def check_components(source: str, components: tuple[str, ...], revision: str | None = None) -> None:
    """Raise ``UserError`` when ``source`` lacks one of ``components`` or one belongs to another model."""
    if os.path.isdir(source):
        index = Path(source) / "model_index.json"
        if index.is_file():
            try:
                pipeline = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            except ValueError:
                pipeline = ""
            if pipeline and not pipeline.startswith("Flux"):
                raise UserError(
                    f"model.pretrained '{source}' is a {pipeline} folder, not FLUX.1 Kontext "
                    f"(model_index.json); the kontext trainer needs a {KONTEXT_PIPELINE} folder"
                )
            if pipeline and pipeline != KONTEXT_PIPELINE:
                log.warning("model.pretrained '%s' is a %s folder, not %s", source, pipeline, KONTEXT_PIPELINE)
    for component in components:
        if component in TOKENIZERS:
            if os.path.isdir(source) and not (Path(source) / component).is_dir():
                raise UserError(f"model.pretrained '{source}' is missing the component '{component}' (no {component}/)")
            continue
        filename, key, accepted, expected = CONFIG_CHECKS[component]
        config = _read_config(source, component, filename, revision)
        found = config.get(key)
        if found not in accepted:
            raise UserError(
                f"model.pretrained '{source}' is not a FLUX.1 Kontext model: {component}/{filename} has "
                f"{key} {found!r}, expected {expected}"
            )


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def _loading(source: str, component: str, load):
    try:
        return load()
    except OSError as err:
        raise UserError(f"model.pretrained '{source}': cannot load {component}: {err}") from err
    except RuntimeError as err:
        if "GPU" not in str(err):  # only diffusers' "a GPU is needed" refusals (pre-quantized weights) are user errors
            raise
        raise UserError(f"model.pretrained '{source}': {component} holds pre-quantized weights that need a GPU to "
                        f"load ({err}); on CPU, load the unquantized model and set model.quantize instead") from err


def load_transformer(model: ModelConfig) -> torch.nn.Module:
    """The frozen ``FluxTransformer2DModel`` in ``model.dtype`` on CPU."""
    dtype = torch_dtype(model)
    if is_tiny(model):
        from qflux_kontext.tiny import tiny_transformer

        return _frozen(torch.nn.Module.to(tiny_transformer(), dtype))
    from diffusers import FluxTransformer2DModel

    source = resolve_source(model)
    check_components(source, ("transformer",), model.revision)
    transformer = _loading(
        source,
        "transformer",
        lambda: FluxTransformer2DModel.from_pretrained(
            source, subfolder="transformer", revision=model.revision, torch_dtype=dtype, use_safetensors=True
        ),
    )
    return _frozen(transformer)


def load_scheduler_config(model: ModelConfig) -> dict[str, Any]:
    """The scheduler config (``scheduler/scheduler_config.json``; ``builtin:tiny``: the real model's values)."""
    if is_tiny(model):
        from qflux_kontext.tiny import SCHEDULER_CONFIG

        return dict(SCHEDULER_CONFIG)
    source = resolve_source(model)
    check_components(source, ("scheduler",), model.revision)
    return _read_config(source, "scheduler", "scheduler_config.json", model.revision)


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
        check_components(
            source, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"), rev
        )
        loaders = {
            "vae": lambda: AutoencoderKL.from_pretrained(
                source, subfolder="vae", revision=rev, torch_dtype=dtype, use_safetensors=True
            ),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", revision=rev, dtype=dtype, use_safetensors=True
            ),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=rev),
            "text_encoder_2": lambda: T5EncoderModel.from_pretrained(
                source, subfolder="text_encoder_2", revision=rev, dtype=dtype, use_safetensors=True
            ),
            "tokenizer_2": lambda: T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", revision=rev),
        }
        parts = {name: _loading(source, name, load) for name, load in loaders.items()}
        scheduler_config = _loading(
            source,
            "scheduler",
            lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", revision=rev).config,
        )
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = parts[name]
        if module.dtype != dtype:
            torch.nn.Module.to(module, dtype)
        _frozen(module)
    return KontextEncoders(
        scheduler_config=dict(scheduler_config),
        max_sequence_length=min(512, int(parts["tokenizer_2"].model_max_length)),
        source=source,
        **parts,
    )
