"""LoRA files and peft plumbing: the LoRA on the frozen transformer (peft through diffusers' ``PeftAdapterMixin``) and its export.

The exported file is diffusers' LoRA format (``transformer.``-prefixed peft keys plus adapter metadata, the
prefix being the trainer's pipeline class's ``transformer_name``) with alpha / rank baked into ``lora_B``, so
that ``Pipeline.load_lora_weights`` and ComfyUI (which ignores the metadata) apply the same strength
(docs/comfyui.md). Training checkpoints keep the unbaked tensors (they reload into training) and record their
alpha in the same header entry. ``load_lora_file`` loads all of them, and refuses a file whose tensors do not
all land on the transformer.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import torch

from qflux.config.schema import LoraConfig
from qflux.errors import ConfigError, UserError, write_failure
from qflux.layout import LORA_FILE  # noqa: F401 - the export's file name, re-exported

LORA_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # diffusers pipelines' transformer_name: the prefix of a pipeline LoRA's keys
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
        use_dora=lora.dora,
        use_rslora=lora.rslora,
    )


def missing_targets(targets: list[str], module_names: list[str]) -> list[str]:
    """The targets no module matches; peft's rule: a target is a whole name or a dotted suffix of one."""
    leaves = {name.rsplit(".", 1)[-1] for name in module_names}
    return [t for t in targets if t not in leaves and not any(n == t or n.endswith("." + t) for n in module_names)]


def linear_leaves(transformer: torch.nn.Module) -> list[str]:
    """Short names of the Linear layers (``to_out.0``: a numbered child is named with its parent)."""
    def leaf(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    return sorted({leaf(n) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)})


def targets_message(missing: list[str], transformer: torch.nn.Module, key: str = "model.lora.targets") -> str:
    import difflib

    linear = linear_leaves(transformer)
    close = [c for t in missing for c in difflib.get_close_matches(t, linear, n=1, cutoff=0.6)]
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return (f"{key}: no module named {', '.join(repr(t) for t in missing)} in "
            f"{type(transformer).__name__}; {hint}its linear layers are named "
            f"{', '.join(linear[:24])}{' ...' if len(linear) > 24 else ''}")


def attach_lora(transformer: torch.nn.Module, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, add the adapter, keep LoRA parameters in float32; returns the trainable ones."""
    transformer.requires_grad_(False)
    missing = missing_targets(list(lora.targets), [name for name, _ in transformer.named_modules()])
    if missing:
        raise ConfigError(targets_message(missing, transformer))
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
    # a copy even on CPU: a caller that keeps it (a checkpoint being written, an EMA) must not see training move it
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_lora_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by ``lora_state_dict`` into the attached adapter (strict on the LoRA keys)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise UserError(f"LoRA state does not fit this transformer: unexpected keys {unexpected[:3]}...")


def pipeline_class(pipeline: str) -> type:
    """The class named by ``TrainerInfo.pipeline`` ("diffusers.FluxKontextPipeline")."""
    module, _, name = pipeline.rpartition(".")
    return getattr(importlib.import_module(module), name)


def adapter_metadata(lora: LoraConfig, *, baked: bool) -> dict:
    """The peft ``LoraConfig`` as diffusers stores it in ``lora_adapter_metadata`` (JSON-ready).

    ``baked``: the peft scale (alpha / rank, or alpha / sqrt(rank) with ``rslora``) is already multiplied into
    ``lora_B``, so the file records ``lora_alpha = r`` and ``use_rslora = false`` (scale 1): diffusers, ComfyUI
    (which reads no metadata and applies 1.0 without ``.alpha`` tensors) and any other loader then apply the same
    strength. DoRA keeps ``use_dora``: its magnitude applies to ``W + scale * B @ A``, the same with the scale
    baked into ``B``."""
    metadata = peft_config(lora).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    if baked:
        metadata["lora_alpha"] = metadata["r"]
        metadata["alpha_pattern"] = dict(metadata.get("rank_pattern") or {})
        metadata["use_rslora"] = False
    return metadata


def checkpoint_lora_metadata(lora: LoraConfig) -> dict[str, str]:
    """Safetensors header entries of a training checkpoint's (unbaked, unprefixed) LoRA: its real alpha, so
    ``load_lora_file`` (and diffusers' ``load_lora_adapter(..., prefix=None)``) apply the trained strength."""
    return {LORA_ADAPTER_METADATA: json.dumps(adapter_metadata(lora, baked=False), indent=2, sort_keys=True)}


def baked_lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``lora_state_dict`` with each module's peft scale (alpha / rank; alpha / sqrt(rank) with rsLoRA)
    multiplied into its ``lora_B``; a DoRA magnitude (``lora_magnitude_vector``) as it is."""
    state = lora_state_dict(transformer)
    for key in state:
        if ".lora_B." in key:
            scaling = transformer.get_submodule(key.split(".lora_B.")[0]).scaling[ADAPTER]
            state[key] = (state[key].float() * float(scaling)).to(state[key].dtype).contiguous()
    return state


def export_lora(transformer: torch.nn.Module, pipeline: str, lora: LoraConfig, directory: Path,
                extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` in diffusers format, alpha / rank baked into
    ``lora_B`` and ``lora_alpha = r`` in the adapter metadata, so it has one strength everywhere.

    No ``.alpha`` tensors: diffusers' Qwen loader takes any file holding them for a non-diffusers LoRA and
    converts (and re-prefixes) it. ``extra_metadata`` (e.g. ``{"qflux.training_sizes": ...}``) is stored as
    further header entries next to ``lora_adapter_metadata``. The write is atomic (a temporary file renamed
    into place) and the file gets the umask's normal mode."""
    extra = dict(extra_metadata or {})
    clash = sorted(set(extra) & {"format", LORA_ADAPTER_METADATA})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if clash or bad:  # a caller's bug, not a user's mistake
        raise ValueError(f"extra_metadata: reserved keys {clash} or non-string entries {bad}")
    prefix = getattr(pipeline_class(pipeline), "transformer_name", PREFIX)
    tensors = {f"{prefix}.{k}": v for k, v in baked_lora_state_dict(transformer).items()}
    # diffusers' own layout of the header (``write_lora_layers``): keys of the metadata carry the prefix too
    packed = {f"{prefix}.{k}": v for k, v in adapter_metadata(lora, baked=True).items()}
    header = {"format": "pt", LORA_ADAPTER_METADATA: json.dumps(packed, indent=2, sort_keys=True), **extra}
    return write_export(tensors, header, directory / LORA_FILE, "LoRA")


def write_export(tensors: dict[str, torch.Tensor], header: dict[str, str], target: Path, what: str) -> Path:
    """Write an adapter export atomically (``_write_atomic``); a failed write is a ``UserError`` naming the
    ``what`` (``LoRA``, ``LoKr``, ...) file and how to get it written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(tensors, header, target)
    except OSError as err:
        named = err  # the message names the adapter file, not its (removed) temporary file
        if err.filename and Path(err.filename).name.startswith(TEMP_PREFIX):
            named = OSError(err.errno, err.strerror)
        failure = write_failure(named, f"the {what} {target}")
        raise UserError(f"{failure}; then run the same command with --resume: it writes the {what} from the last "
                        "checkpoint") from err
    return target


TEMP_PREFIX = ".export-"  # the export's temporary files: .export-<pid>-<random>.safetensors next to the LoRA


def _write_atomic(tensors: dict[str, torch.Tensor], header: dict[str, str], target: Path) -> None:
    """Write a safetensors file next to ``target`` and rename it into place; nothing is left on failure.

    A process killed mid-write leaves ``target`` as it was (the previous export, or none) and its temporary
    file, which no reader opens (a dot-file that is not the LoRA's name); the next export removes it."""
    import tempfile

    from safetensors.torch import save_file

    from qflux.filemodes import give_normal_mode
    from qflux.killpoints import pause_point

    _remove_stale_temps(target.parent)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".safetensors")
    os.close(fd)
    tmp = Path(name)
    try:
        pause_point("export-temp-open")
        try:
            save_file(tensors, str(tmp), metadata=header)
        except Exception as err:  # safetensors reports a failed write as SafetensorError("... (os error N)")
            raise _as_os_error(err, tmp) from err
        give_normal_mode(tmp)  # mkstemp's 0600 would survive the rename: ComfyUI under another uid could not read it
        pause_point("export-before-rename")
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temps(directory: Path) -> None:
    """Delete the temporary export files of writers that were killed (their process is gone): a real LoRA's
    leftover is hundreds of MB. A live writer's file (another process still exporting here) is left alone."""
    for stale in directory.glob(f"{TEMP_PREFIX}*.safetensors"):
        pid = stale.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                stale.unlink(missing_ok=True)
            except OSError:  # not ours to delete: the write below reports an unwritable folder
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one export at a time: a file of its own pid is a leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user
        return True
    return True


def _as_os_error(err: Exception, path: Path) -> Exception:
    """``err`` as an ``OSError`` when it is an I/O failure reported by another library, else ``err``."""
    if isinstance(err, OSError):
        return err
    match = re.search(r"os error (\d+)", str(err))
    if match:
        code = int(match[1])
        return OSError(code, os.strerror(code), str(path))
    return err


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and header metadata of a safetensors LoRA file (no tensor is loaded).
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
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"--lora {path}: not a readable safetensors LoRA file ({err}); {refused}") from err


def lora_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors LoRA file, read from its header (no tensor is loaded)."""
    return _read_header(path)[0]


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (``lora_adapter_metadata``, ``qflux.*`` entries, ...);
    no tensor is loaded. Empty for a file without metadata."""
    return _read_header(path)[1]


# diffusers' peft keys (lora_A / lora_B, and DoRA's lora_magnitude_vector), kohya's names for the same
# (lora_down / lora_up), and a kohya alpha
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|"
                       r"lora_magnitude_vector|alpha)")
_PART = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha",
         "lora_magnitude_vector": "M"}
_HINT = "use a LoRA trained for this trainer's model family, or set trainer / model.pretrained to its model"


def lora_landing(transformer: torch.nn.Module, path: Path,
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """Module name -> {"A" | "B" | "alpha" | "M": file key}: where every tensor of the file lands on ``transformer``
    ("M": a DoRA magnitude, which every module of the file then has).

    ``UserError`` unless every tensor lands: a tensor of another component (a text encoder), a module this
    transformer does not have (a LoRA of another model family), a module with other sizes, a half pair, or a
    tensor that is no LoRA factor would otherwise be dropped with a warning, and the image of the base model
    would come out as if the LoRA were applied."""
    modules = dict(transformer.named_modules())
    model = type(transformer).__name__
    parts: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    stray: list[tuple[str, str]] = []
    for key in shapes:
        match = _LORA_KEY.fullmatch(key.removeprefix(PREFIX + "."))
        if match is None:
            stray.append((key, "not a LoRA factor (<module>.lora_A.weight / .lora_B.weight / .alpha)"))
        elif match["module"] not in modules:
            unknown.append(match["module"])
        else:
            parts.setdefault(match["module"], {})[_PART[match["part"]]] = key
    if not parts and not unknown:
        raise UserError(f"--lora {path} holds no LoRA tensors (<module>.lora_A.weight / .lora_B.weight); {_HINT}")
    if unknown:
        unknown = sorted(set(unknown))
        raise UserError(f"--lora {path} is not a LoRA for this {model}: {len(unknown)} of its target modules do not "
                        f"exist (e.g. {unknown[0]}); {_HINT}")
    with_magnitude = [m for m, part in parts.items() if "M" in part]
    if with_magnitude and len(with_magnitude) < len(parts):  # diffusers would make every module a DoRA
        stray.append((parts[with_magnitude[0]]["M"], f"a DoRA magnitude, but {len(parts) - len(with_magnitude)} of "
                                                     f"the file's {len(parts)} modules have none"))
    for module, part in parts.items():
        if "M" in part:
            problem = _misfit(modules[module], part["M"], shapes[part["M"]])
            if problem:
                raise UserError(f"--lora {path} does not fit this {model}: {part['M']} {problem}; {_HINT}")
        if "A" not in part or "B" not in part:
            stray.append((next(iter(part.values())), "its lora_A / lora_B partner is missing"))
            continue
        for key in (part["A"], part["B"]):  # same module names, other sizes: a LoRA of another model of the family
            problem = _misfit(modules[module], key, shapes[key])
            if problem:
                raise UserError(f"--lora {path} does not fit this {model}: {key} {problem}; {_HINT}")
        if shapes[part["A"]][0] != shapes[part["B"]][-1]:
            stray.append((part["B"], f"its rank {shapes[part['B']][-1]} differs from lora_A's {shapes[part['A']][0]}"))
    if stray:
        key, why = stray[0]
        raise UserError(f"--lora {path}: {len(stray)} of its {len(shapes)} tensors would not land on this {model} "
                        f"(e.g. {key}: {why}); qflux loads diffusers-format LoRAs of the transformer only")
    return parts


def load_lora_file(transformer: torch.nn.Module, path: Path) -> None:
    """Load a LoRA file qflux wrote (final export, training checkpoint, best step) or any diffusers-format
    transformer LoRA onto ``transformer`` with the strength it was trained with, after checking that every
    tensor lands (``lora_landing``).

    The strength comes from, in this order: ``.alpha`` tensors (ComfyUI's and kohya's rule: alpha / rank,
    1.0 without), the ``lora_adapter_metadata`` header entry (diffusers; a baked export records alpha = rank),
    the run's ``config.yaml`` for a checkpoint written before checkpoints carried that entry, else 1.0
    (diffusers' convention for a file without alpha)."""
    from safetensors.torch import load_file

    shapes, header = _read_header(path)
    parts = lora_landing(transformer, path, shapes)
    tensors = load_file(str(path))
    state: dict[str, torch.Tensor] = {}
    with_alpha = any("alpha" in part for part in parts.values())
    for module, part in parts.items():
        down, up = tensors[part["A"]], tensors[part["B"]]
        if with_alpha and "alpha" in part:
            up = up.float() * (tensors[part["alpha"]].float().item() / down.shape[0])
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = down, up
        if "M" in part:  # DoRA: applied to W + scale * B @ A, so a scale folded into B above is right
            state[f"{module}.lora_magnitude_vector"] = tensors[part["M"]]
    metadata = None if with_alpha else _adapter_metadata_of(path, header, shapes)
    try:
        transformer.load_lora_adapter(state, prefix=None, adapter_name=ADAPTER, metadata=metadata)
    except (TypeError, ValueError, KeyError) as err:  # e.g. metadata of a peft version that has other fields
        raise UserError(f"--lora {path}: diffusers cannot load it onto this {type(transformer).__name__} "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    missed = [m for m in parts if ADAPTER not in getattr(transformer.get_submodule(m), "lora_A", {})]
    if missed:  # the checks above should make this impossible; never sample the base model silently
        transformer.delete_adapters(ADAPTER)
        raise UserError(f"--lora {path}: {len(missed)} of its modules got no adapter (e.g. {missed[0]}); "
                        "qflux loads diffusers-format LoRAs of the transformer only")


def _adapter_metadata_of(path: Path, header: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """The peft config recorded for the transformer (prefix removed), or None (scale 1.0)."""
    raw = header.get(LORA_ADAPTER_METADATA)
    if raw:
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise UserError(f"--lora {path}: its lora_adapter_metadata is not JSON ({err}); re-export it") from err
        if any(k.startswith(PREFIX + ".") for k in data):  # a pipeline file: entries of each component, prefixed
            data = {k.removeprefix(PREFIX + "."): v for k, v in data.items() if k.startswith(PREFIX + ".")}
        return data or None
    if all(k.startswith(PREFIX + ".") for k in shapes) or not _is_checkpoint_lora(path):
        return None
    return _checkpoint_metadata_from_run(path, shapes)


def _is_checkpoint_lora(path: Path) -> bool:
    """A training checkpoint's LoRA (``checkpoints/step-NNNNNN/lora.safetensors``)."""
    from qflux.layout import CHECKPOINT_ADAPTER, CHECKPOINT_MANIFEST, CHECKPOINTS

    return (path.name == CHECKPOINT_ADAPTER and path.parent.parent.name == CHECKPOINTS
            and (path.parent / CHECKPOINT_MANIFEST).is_file())


def _checkpoint_metadata_from_run(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Rank and alpha of an older checkpoint (no header entry) from its run's ``config.yaml``; a resumed run
    cannot change them (they are part of the checkpoint fingerprint)."""
    import yaml

    config = path.parent.parent.parent / "config.yaml"
    try:
        lora = (yaml.safe_load(config.read_text()) or {})["model"]["lora"]
        rank, alpha, targets = int(lora["rank"]), float(lora["alpha"]), list(lora["targets"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"--lora {path} is a checkpoint LoRA that records no alpha, and its run's {config} cannot "
                        f"tell it ({type(err).__name__}: {err}); sample the run's pytorch_lora_weights.safetensors "
                        "or put the checkpoint back into its run folder") from err
    ranks = {shape[0] for key, shape in shapes.items() if key.endswith((".lora_A.weight", ".lora_down.weight"))}
    if ranks != {rank}:
        raise UserError(f"--lora {path}: its rank {sorted(ranks)} is not the rank {rank} of its run's {config}; "
                        "sample the run's pytorch_lora_weights.safetensors")
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets}


def _misfit(module: torch.nn.Module, key: str, shape: tuple[int, ...]) -> str | None:
    """Why the LoRA tensor ``key`` of ``shape`` cannot sit on ``module`` (None: it fits, or is not checked).
    A / down matrices are ``[rank, in_features]``, B / up matrices ``[out_features, rank]``, a DoRA magnitude
    ``[out_features]``."""
    base = getattr(module, "base_layer", module)
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if key.endswith(".lora_magnitude_vector") and out_f is not None and tuple(shape) != (out_f,):
        return f"has shape {list(shape)} but the module has {out_f} output features (a DoRA magnitude is [{out_f}])"
    if in_f is None or out_f is None or not key.endswith(".weight") or len(shape) != 2:
        return None
    if (".lora_A." in key or ".lora_down." in key) and shape[1] != in_f:
        return f"has shape {list(shape)} but the module takes {in_f} input features"
    if (".lora_B." in key or ".lora_up." in key) and shape[0] != out_f:
        return f"has shape {list(shape)} but the module has {out_f} output features"
    return None
