"""Model helpers every trainer plugin needs: devices and dtypes of modules, unwrapping, eval mode, freezing,
guarded ``from_pretrained`` loading, the check of a diffusers folder against a declared table of components,
and the flow-match sampling schedule of the FLUX / Qwen-Image pipelines.

Plugins import these from ``qflux.plugin_api``. Nothing here imports torch, diffusers or huggingface_hub at
module import (``qflux plugins list`` imports the plugin modules): each helper imports what it needs when called.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qflux.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# attributes under which wrappers keep the model they wrap: DDP / FSDP / accelerate, torch.compile, peft
WRAPPER_ATTRIBUTES = ("module", "_orig_mod", "base_model")
HUB_HINT = (
    "check the connection and that your token (HF_TOKEN or `hf auth login`) has access to the repo, or download "
    "it (`hf download {source} --local-dir DIR`) and set model.pretrained to DIR"
)


# --------------------------------------------------------------------------- modules


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else its first buffer; a module with neither: the CPU).

    ``device_of(encoders.vae)`` is where inputs to the VAE must go.
    """
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its wrappers: DDP / FSDP / accelerate (``.module``), ``torch.compile`` (``._orig_mod``)
    and a peft ``PeftModel`` (``.base_model``, then the tuner's ``.model``).

    A diffusers model with a LoRA attached by ``add_adapter`` (how qflux attaches it) is not wrapped and comes
    back as it is. Read the model's ``config``, ``dtype`` or flags (``zero_cond_t``) on what this returns.
    """
    import torch

    for _ in range(8):
        inner = None
        for attr in WRAPPER_ATTRIBUTES:
            candidate = getattr(model, attr, None)
            if isinstance(candidate, torch.nn.Module) and candidate is not model:
                if attr == "base_model" and not _is_peft(model):
                    continue  # transformers models have a base_model too (their backbone): not a wrapper
                inner = candidate
                break
        if inner is None and _is_peft(model):
            candidate = getattr(model, "model", None)  # peft's tuner (LoraModel) keeps the model as .model
            if isinstance(candidate, torch.nn.Module) and candidate is not model:
                inner = candidate
        if inner is None:
            return model
        model = inner
    return model


def _is_peft(model: Any) -> bool:
    return type(model).__module__.split(".")[0] == "peft"


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype ``module`` computes in: the unwrapped model's ``dtype`` when it is a floating dtype
    (diffusers and transformers models have one), else its first floating parameter's, else float32.

    Quantized models hold integer weights; this still answers their compute dtype (norms, biases, LoRA).
    """
    import torch

    dtype = getattr(unwrap(module), "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block and give every submodule its own train/eval mode back after.

    ``with eval_mode(transformer): ...`` around sampling in the middle of training: dropout is off for the
    images and the training run goes on in the mode it was in.
    """
    saved = [(module, [(m, m.training) for m in module.modules()]) for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, modes in saved:
            module.train(modes[0][1])  # its own train(), which a class may override; then the exceptions
            for m, training in modes:
                if m.training != training:
                    m.training = training


def frozen(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module`` in eval mode with ``requires_grad`` off everywhere (in place; returned for chaining).

    ``dtype``: also cast the floating weights when ``compute_dtype(module)`` differs (built-in tiny models are
    made in float32). A module loaded in ``dtype`` whose class keeps some layers in float32 (T5's
    ``_keep_in_fp32_modules``) is left as it is. The cast is ``torch.nn.Module.to``, which diffusers and
    transformers cannot refuse.
    """
    import torch

    if dtype is not None and compute_dtype(module) != dtype:
        torch.nn.Module.to(module, dtype)
    return module.eval().requires_grad_(False)


def guarded_load(cls: Any, source: str, component: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, subfolder=component, **kwargs)`` with the failures a user can fix turned
    into a ``UserError`` naming the source and the component:

    - ``OSError`` (missing or unreadable files, no access to a hub repo) and ``ValueError`` (weights that do
      not fit the config, an unknown argument of the folder's config): "cannot load {component}";
    - a ``RuntimeError`` that mentions a GPU: diffusers refuses to load pre-quantized weights without one;
      the message says to load the unquantized model and set ``model.quantize`` instead.

    Any other error is a bug and propagates as it is.
    """
    import torch

    try:
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):  # weights: from safetensors only, always
            kwargs.pop("use_safetensors", None)
            return cls.from_pretrained(source, subfolder=component, use_safetensors=True, **kwargs)
        # a tokenizer, scheduler or processor: no weights (tests/test_safety.py allows this one call)
        return cls.from_pretrained(source, subfolder=component, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{source}': cannot load {component}: {err}") from err
    except RuntimeError as err:
        if "GPU" not in str(err):
            raise
        raise UserError(
            f"model.pretrained '{source}': {component} holds pre-quantized weights that need a GPU to load "
            f"({err}); on CPU, load the unquantized model and set model.quantize instead"
        ) from err


# --------------------------------------------------------------------------- folder checks


@dataclass(frozen=True)
class Component:
    """What one subfolder of a model's diffusers folder holds, for ``check_model``.

    ``files``: its config file(s), the first one found is read; empty: the subfolder only has to exist (checked
    in a local folder only). ``key``: the config key naming what it is (``_class_name`` for diffusers,
    ``model_type`` for transformers); None: a file only has to exist. ``accepted``: the values of ``key`` that
    belong to the family. ``expected``: how messages name it (default: the first accepted value).
    """

    files: tuple[str, ...] = ("config.json",)
    key: str | None = "_class_name"
    accepted: tuple[str, ...] = ()
    expected: str = ""


@dataclass(frozen=True)
class ModelFamily:
    """The declared layout of a model family's diffusers folder, for ``check_model``.

    ``name`` is how messages name the family ("FLUX.1 Kontext"); ``pipeline`` the ``model_index.json``
    ``_class_name`` the trainer is made for; a folder whose pipeline does not start with ``pipeline_prefix``
    belongs to another family (refused), one of the family with another pipeline is a warning. ``trainer`` and
    ``example`` (a hub id) go into the messages; ``layout`` says which subfolders a complete folder has.
    """

    name: str
    pipeline: str
    components: Mapping[str, Component]
    pipeline_prefix: str = ""
    trainer: str = ""
    example: str = ""
    layout: str = ""


def _hub_file(source: str, filename: str, subfolder: str | None, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, filename, subfolder=subfolder, revision=revision))


def _read_json(source: str, file: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained '{source}': {what} is not valid JSON: {err}") from err


def component_file(source: str, family: ModelFamily, component: str, revision: str | None = None) -> Path:
    """The first of ``component``'s declared config files in ``source`` (a folder or a hub id, read at
    ``revision``); a ``UserError`` when there is none (missing component, no access to the hub)."""
    names = family.components[component].files
    if os.path.isdir(source):
        for name in names:
            file = Path(source) / component / name
            if file.is_file():
                return file
        raise UserError(
            f"model.pretrained '{source}' is missing the component '{component}' ({component}/{names[0]} not "
            f"found)" + (f"; {family.layout}" if family.layout else "")
        )
    errors = []
    for name in names:
        try:
            return _hub_file(source, name, component, revision)
        except (OSError, ValueError) as err:  # huggingface_hub's errors derive from these
            errors.append(f"{type(err).__name__}: {err}")
    raise UserError(
        f"model.pretrained '{source}': cannot read {component}/{names[0]} from the hub (revision "
        f"{revision or 'main'}): {errors[0]}; " + HUB_HINT.format(source=source)
    )


def read_component_config(source: str, family: ModelFamily, component: str, revision: str | None = None) -> dict:
    """``component``'s config file in ``source`` as a dict (e.g. ``scheduler/scheduler_config.json``)."""
    file = component_file(source, family, component, revision)
    return _read_json(source, file, f"{component}/{file.name}")


def _model_index(source: str, revision: str | None) -> Path | None:
    if os.path.isdir(source):
        index = Path(source) / "model_index.json"
        return index if index.is_file() else None
    try:
        return _hub_file(source, "model_index.json", None, revision)
    except (OSError, ValueError):  # no index (or no access): the component checks say what is wrong
        return None


def check_pipeline(source: str, family: ModelFamily, revision: str | None = None) -> None:
    """``model_index.json`` (when there is one) must name a pipeline of ``family``: another family's is a
    ``UserError``, another pipeline of the family a warning."""
    index = _model_index(source, revision)
    if index is None:
        return
    pipeline = _read_json(source, index, "model_index.json").get("_class_name", "")
    if not pipeline or pipeline == family.pipeline:
        return
    if family.pipeline_prefix and not pipeline.startswith(family.pipeline_prefix):
        raise UserError(
            f"model.pretrained '{source}' is a {pipeline} folder, not {family.name} (model_index.json); the "
            f"{family.trainer or family.name} trainer needs a {family.pipeline} folder"
            + (f" such as {family.example}" if family.example else "")
        )
    log.warning(
        "model.pretrained '%s' is a %s folder; the %s trainer expects %s",
        source,
        pipeline,
        family.trainer or family.name,
        family.pipeline,
    )


def check_model(
    source: str, family: ModelFamily, components: Iterable[str] | None = None, revision: str | None = None
) -> None:
    """Refuse (``UserError`` naming ``source`` and the problem) a folder or hub repo that belongs to another
    family (``check_pipeline``), lacks one of ``components`` (default: every component of the table) or holds
    one of another model. Reads only the small config files, before any weights.

    ``FAMILY = ModelFamily("FLUX.1 Kontext", "FluxKontextPipeline", {"vae": Component(accepted=("AutoencoderKL",))},
    pipeline_prefix="Flux")``, then ``check_model(folder, FAMILY, ("vae",))``.
    """
    check_pipeline(source, family, revision)
    for component in family.components if components is None else components:
        spec = family.components[component]
        if not spec.files:
            if os.path.isdir(source) and not (Path(source) / component).is_dir():
                raise UserError(f"model.pretrained '{source}' is missing the component '{component}' (no {component}/)")
            continue
        file = component_file(source, family, component, revision)
        if spec.key is None:
            continue
        found = _read_json(source, file, f"{component}/{file.name}").get(spec.key)
        if found not in spec.accepted:
            raise UserError(
                f"model.pretrained '{source}' is not a {family.name} model: {component}/{file.name} has "
                f"{spec.key} {found!r}, expected {spec.expected or spec.accepted[0]}"
            )


# --------------------------------------------------------------------------- sampling


def flow_match_timesteps(scheduler: Any, steps: int, image_seq_len: int, device: Any) -> torch.Tensor:
    """Set ``scheduler`` (a ``FlowMatchEulerDiscreteScheduler``) up for ``steps`` denoising steps as the FLUX,
    FLUX Kontext and Qwen-Image pipelines do, and return its timesteps.

    Sigmas ``linspace(1, 1/steps, steps)``, the dynamic shift ``mu = calculate_shift(image_seq_len, ...)`` from
    the scheduler config (``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``), then
    ``retrieve_timesteps`` and ``set_begin_index(0)``. ``image_seq_len`` is the target's token count
    (``latents.shape[1]`` of packed latents). Loop with ``for t in timesteps: ... scheduler.step(v, t, x)``.
    """
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    return timesteps
