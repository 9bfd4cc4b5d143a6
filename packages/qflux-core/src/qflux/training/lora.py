"""LoRA on the frozen transformer (peft through diffusers' ``PeftAdapterMixin``) and its export.

The exported file is diffusers' LoRA format (``transformer.``-prefixed peft keys plus adapter metadata),
written by the trainer's own pipeline class so that ``Pipeline.load_lora_weights`` reads it back.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from qflux.config.schema import LoraConfig
from qflux.errors import ConfigError, UserError
from qflux.types import TrainerInfo

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "default"
_INIT = {"gaussian": "gaussian", "default": True}


def peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.targets),
        init_lora_weights=_INIT[lora.init],
        lora_dropout=lora.dropout,
    )


def attach_lora(transformer: torch.nn.Module, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, add the adapter, keep LoRA parameters in float32; returns the trainable ones."""
    transformer.requires_grad_(False)
    names = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()}
    full = {name for name, _ in transformer.named_modules()}
    missing = [t for t in lora.targets if t not in names and not any(n.endswith("." + t) for n in full)]
    if missing:
        import difflib

        def leaf(name: str) -> str:  # "to_out.0", "net.2": a numbered child is named with its parent
            parts = name.split(".")
            return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

        linear = sorted({leaf(n) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)})
        close = [c for t in missing for c in difflib.get_close_matches(t, linear, n=1, cutoff=0.6)]
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"model.lora.targets: no module named {', '.join(repr(t) for t in missing)} in "
                          f"{type(transformer).__name__}; {hint}its linear layers are named "
                          f"{', '.join(linear[:24])}{' ...' if len(linear) > 24 else ''}")
    transformer.add_adapter(peft_config(lora), adapter_name=ADAPTER)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # LoRA trains in float32 on top of a bf16 / quantized base
        p.data = p.data.float()
    return params


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors with peft's key names (no ``transformer.`` prefix), on CPU.

    Read from the parameters, not from ``transformer.state_dict()``: on a sharded base (``train.fsdp``) that
    call reshards the calling process's unsharded blocks, and the next forward's all-gathers would no longer
    match the other processes'."""
    from peft import get_peft_model_state_dict

    params = {name: p for name, p in transformer.named_parameters() if "lora_" in name}
    state = get_peft_model_state_dict(transformer, state_dict=params, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by ``lora_state_dict`` into the attached adapter (strict on the LoRA keys)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise UserError(f"LoRA state does not fit this transformer: unexpected keys {unexpected[:3]}...")


def pipeline_class(trainer: TrainerInfo) -> type:
    module, _, name = trainer.pipeline.rpartition(".")
    return getattr(importlib.import_module(module), name)


def export_lora(transformer: torch.nn.Module, trainer: TrainerInfo, lora: LoraConfig, directory: Path) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` in diffusers format (with adapter metadata)."""
    import tempfile

    from qflux.training.checkpoint import write_failure

    metadata = peft_config(lora).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    target = directory / LORA_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".export-") as tmp:  # atomic: write, then rename
            try:
                pipeline_class(trainer).save_lora_weights(
                    save_directory=tmp,
                    transformer_lora_layers=lora_state_dict(transformer),
                    transformer_lora_adapter_metadata=metadata,
                    weight_name=LORA_FILE,
                )
            except Exception as err:  # safetensors reports a failed write as SafetensorError("... (os error N)")
                raise _as_os_error(err, Path(tmp, LORA_FILE)) from err
            Path(tmp, LORA_FILE).replace(target)
    except OSError as err:
        failure = write_failure(err, f"the LoRA {target}")
        raise UserError(f"{failure}; then run the same command with --resume: it writes the LoRA from the last "
                        "checkpoint") from err
    return target


def _as_os_error(err: Exception, path: Path) -> Exception:
    """``err`` as an ``OSError`` when it is an I/O failure reported by another library, else ``err``."""
    import re

    if isinstance(err, OSError):
        return err
    match = re.search(r"os error (\d+)", str(err))
    if match:
        code = int(match[1])
        return OSError(code, os.strerror(code), str(path))
    return err


def lora_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors LoRA file, read from its header (no tensor is loaded).
    ``UserError`` when the file is missing or not safetensors (pickled files are never unpickled)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"--lora: LoRA file not found: {path}")
    refused = ("qflux reads LoRAs only as .safetensors (pickled .bin/.ckpt/.pt files are refused): convert it or use "
               "the pytorch_lora_weights.safetensors of a qflux run")
    if path.suffix.lower() != ".safetensors":  # diffusers picks its reader by the extension: never a pickle reader
        raise UserError(f"--lora {path}: not a .safetensors file; {refused}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"--lora {path}: not a readable safetensors LoRA file ({err}); {refused}") from err


def load_lora_file(transformer: torch.nn.Module, path: Path) -> None:
    """Load a diffusers-format LoRA file onto ``transformer`` after checking that it fits.

    A file whose keys name modules this transformer does not have (a LoRA of another model family) is a
    user error, not a silent no-op.
    """
    shapes = lora_file_shapes(path)
    modules = dict(transformer.named_modules())
    lora_keys = [k for k in shapes if ".lora_A." in k or ".lora_B." in k or ".lora_down." in k or ".lora_up." in k]
    targets = {k.removeprefix("transformer.").split(".lora_")[0] for k in lora_keys}
    unknown = sorted(t for t in targets if t not in modules)
    hint = "use a LoRA trained for this trainer's model family, or set trainer / model.pretrained to its model"
    if not lora_keys or unknown:
        example = f" (e.g. {unknown[0]})" if unknown else ""
        raise UserError(f"--lora {path} is not a LoRA for this {type(transformer).__name__}: "
                        f"{len(unknown) or 'no'} of its target modules do not exist{example}; {hint}")
    for key in lora_keys:  # same module names, other sizes: a LoRA of another model of the family
        problem = _misfit(modules[key.removeprefix("transformer.").split(".lora_")[0]], key, shapes[key])
        if problem:
            raise UserError(f"--lora {path} does not fit this {type(transformer).__name__}: {key} {problem}; {hint}")
    transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name=ADAPTER)


def _misfit(module: torch.nn.Module, key: str, shape: tuple[int, ...]) -> str | None:
    """Why the LoRA tensor ``key`` of ``shape`` cannot sit on ``module`` (None: it fits, or is not checked).
    A / down matrices are ``[rank, in_features]``, B / up matrices ``[out_features, rank]``."""
    base = getattr(module, "base_layer", module)
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if in_f is None or out_f is None or not key.endswith(".weight") or len(shape) != 2:
        return None
    if (".lora_A." in key or ".lora_down." in key) and shape[1] != in_f:
        return f"has shape {list(shape)} but the module takes {in_f} input features"
    if (".lora_B." in key or ".lora_up." in key) and shape[0] != out_f:
        return f"has shape {list(shape)} but the module has {out_f} output features"
    return None
