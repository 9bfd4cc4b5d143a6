"""musubi-tuner dataset TOML plus its training command-line arguments -> qflux config.

musubi splits a run into a dataset file (``[general]`` + ``[[datasets]]``) and the arguments of its training
script (``qwen_image_train_network.py --model_version edit-2509 --network_dim 16 ...``,
``flux_kontext_train_network.py ...``). Both are read: the dataset gives ``data.*`` and the batch size, the
arguments the trainer, LoRA, optimiser, timestep sampling and output. musubi loads single ``.safetensors``
files (``--dit``/``--vae``/``--text_encoder``) where qflux loads a diffusers folder or hub id, so
``model.pretrained`` stays the trainer's default model and the note says so.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import tomllib

from qflux.errors import ConfigError
from qflux.importers import ImportResult, optimizer_name, square_budget

MODEL_VERSIONS = {"edit": "qwen-edit", "edit-2509": "qwen-edit-plus", "edit-2511": "qwen-edit-2511"}
TIMESTEPS = {"sigmoid": "sigmoid", "uniform": "uniform", "logsnr": "logit_normal", "flux_shift": "resolution_shift",
             "qwen_shift": "resolution_shift", "shift": "shift"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}
# arguments that only choose kernels, loaders or logging: no effect on what is learnt, no note needed
QUIET = {"sdpa", "xformers", "flash_attn", "split_attn", "max_data_loader_n_workers", "persistent_data_loader_workers",
         "num_cpu_threads_per_process", "dataset_config", "logging_dir", "log_with", "disable_numpy_memmap"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def read_dataset_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"dataset config not found: {path}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid TOML file ({err})") from err


def parse_args(args: list[str]) -> dict[str, Any]:
    """``--name value`` / ``--flag`` / ``--name=value`` -> {name: value or True}; a repeated option keeps a list.
    A single argument holding the whole command line (quoted) is split like a shell would."""
    if len(args) == 1 and " " in args[0]:
        args = shlex.split(args[0])
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            if arg.endswith(".py"):
                out.setdefault("_script", Path(arg).name)
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq:
            value = True
            if i < len(args) and not args[i].startswith("--"):
                value = args[i]
                i += 1
        name = name.replace("-", "_")
        if name in out and name == "optimizer_args":
            out[name] = [*([out[name]] if not isinstance(out[name], list) else out[name]), value]
        else:
            out[name] = value
    return out


def from_musubi(dataset: dict[str, Any], args: list[str], source: Path) -> ImportResult:
    """The qflux config equivalent to a musubi dataset TOML (read from ``source``) and training arguments."""
    result = ImportResult()
    options = parse_args(args)
    result.set("trainer", _trainer(options, source))
    _dataset(dataset, result, source)
    _training(options, result)
    return result


def _trainer(options: dict[str, Any], source: Path) -> str:
    script = str(options.get("_script", ""))
    if "flux_kontext" in script or str(options.get("network_module", "")).endswith("lora_flux"):
        return "kontext"
    version = options.get("model_version")
    if options.get("edit_plus"):
        version = "edit-2509"
    elif options.get("edit"):
        version = "edit"
    if version in MODEL_VERSIONS:
        return MODEL_VERSIONS[version]
    raise ConfigError(f"{source}: the training arguments do not name an edit model: pass the script's arguments "
                      "after the TOML, e.g. `qflux import musubi dataset.toml -- --model_version edit-2509 ...` "
                      "(qflux trains FLUX.1 Kontext and Qwen-Image-Edit / 2509 / 2511)")


def _dataset(toml: dict[str, Any], result: ImportResult, source: Path) -> None:
    general = toml.get("general") or {}
    datasets = [d for d in toml.get("datasets") or [] if isinstance(d, dict)]
    images = [d for d in datasets if "image_directory" in d or "image_jsonl_file" in d]
    if not images:
        raise ConfigError(f"{source}: no [[datasets]] entry with image_directory or image_jsonl_file")
    if len(datasets) > 1:
        result.skip("[[datasets]][1:]", f"{len(datasets) - 1} more dataset(s): a qflux config reads one dataset")
    first = {**general, **images[0]}
    if "image_directory" in first:
        result.set("data.path", str(first["image_directory"]))
        if first.get("control_directory"):
            result.set("data.control_path", str(first["control_directory"]))
    else:
        # musubi's JSONL columns, renamed for qflux's manifest reader
        result.set("data.path", str(first["image_jsonl_file"]))
        result.set("data.columns", {"target": "image_path", "control": "control_path", "prompt": "caption"})
        result.skip("image_jsonl_file", "qflux resolves manifest paths relative to the manifest's folder and refuses "
                                        "absolute paths outside it: move the JSONL next to the images if needed")
    if first.get("caption_extension", ".txt") != ".txt":
        result.skip(f"caption_extension={first['caption_extension']}", "qflux reads captions from <stem>.txt")
    if "resolution" in first:
        width, height = (int(v) for v in first["resolution"])  # musubi's resolution is [W, H]
        if first.get("enable_bucket"):
            result.set("data.resolution", square_budget(width, height))  # keep each image's aspect at W*H pixels
        else:
            result.set("data.resolution", [height, width])  # one fixed size, qflux's [h, w]
    if "batch_size" in first:
        result.set("train.batch_size", int(first["batch_size"]))
    control = first.get("control_resolution") or first.get("qwen_image_edit_control_resolution")
    if control:
        result.set("data.control_resolution", square_budget(int(control[0]), int(control[1])))
    elif first.get("control_directory") or "image_jsonl_file" in first:
        result.skip("control size", "musubi resizes controls to the target's size by default; qflux feeds them at "
                                    "the size the model's pipeline uses at inference (~1 MP); set "
                                    "data.control_resolution: target to keep musubi's (cheaper) behaviour")
    if first.get("no_resize_control") or first.get("qwen_image_edit_no_resize_control") or \
            first.get("flux_kontext_no_resize_control"):
        result.skip("no_resize_control", "qflux sizes controls as the model's pipeline does at inference "
                                          "(data.control_resolution)")
    if int(first.get("num_repeats", 1)) != 1:
        result.skip(f"num_repeats={first['num_repeats']}", "qflux counts optimizer steps (train.max_steps), not "
                                                            "repeats")
    if first.get("cache_directory"):
        result.skip("cache_directory", "qflux keeps one embedding cache for every run (cache.dir)")
    handled = {"image_directory", "image_jsonl_file", "control_directory", "caption_extension", "resolution",
               "enable_bucket", "batch_size", "control_resolution", "qwen_image_edit_control_resolution",
               "no_resize_control", "qwen_image_edit_no_resize_control", "flux_kontext_no_resize_control",
               "num_repeats", "cache_directory", "bucket_no_upscale"}
    for key in sorted(set(first) - handled):
        result.skip(f"dataset.{key}", "no qflux equivalent")


def _training(options: dict[str, Any], result: ImportResult) -> None:
    o = dict(options)
    o.pop("_script", None)
    for flag in ("dit", "vae", "text_encoder"):
        if o.pop(flag, None):
            result.skip(f"--{flag}", "musubi loads single .safetensors files; qflux loads a diffusers folder or hub "
                                     "id: model.pretrained is the trainer's default model, set it if you have a "
                                     "local copy")
    for name in ("model_version", "edit", "edit_plus", "network_module"):
        o.pop(name, None)
    if "network_dim" in o:
        result.set("model.lora.rank", int(o.pop("network_dim")))
    if "network_alpha" in o:
        result.set("model.lora.alpha", float(o.pop("network_alpha")))
    numbers = {"learning_rate": ("train.lr", float), "max_train_steps": ("train.max_steps", int),
               "gradient_accumulation_steps": ("train.grad_accum", int), "seed": ("train.seed", int),
               "lr_warmup_steps": ("train.warmup_steps", int), "max_grad_norm": ("train.max_grad_norm", float),
               "save_every_n_steps": ("train.save_every", int), "logit_mean": ("train.logit_mean", float),
               "logit_std": ("train.logit_std", float), "discrete_flow_shift": ("train.shift", float)}
    for name, (key, kind) in numbers.items():
        if name in o:
            value = kind(o.pop(name))
            if name == "max_grad_norm" and value == 0:
                value = None  # musubi's 0 means no clipping
            result.set(key, value)
    if "lr_scheduler" in o:
        result.set("train.scheduler", str(o.pop("lr_scheduler")))
    if "optimizer_type" in o:
        name = optimizer_name(str(o.pop("optimizer_type")), result, "--optimizer_type")
        if name:
            result.set("train.optimizer", name)
    if "optimizer_args" in o:
        result.skip("--optimizer_args", "write them as train.optimizer_args (a mapping) by hand")
        o.pop("optimizer_args")
    if "timestep_sampling" in o:
        kind = str(o.pop("timestep_sampling"))
        if kind in TIMESTEPS:
            result.set("train.timestep_sampling", TIMESTEPS[kind])
        else:
            result.skip(f"--timestep_sampling {kind}", "no qflux equivalent (kept logit_normal)")
    weighting = o.pop("weighting_scheme", "none")
    if weighting != "none":
        result.skip(f"--weighting_scheme {weighting}", "qflux's loss is unweighted flow matching (plus edit masks)")
    if "mixed_precision" in o:
        result.set("model.dtype", DTYPES.get(str(o.pop("mixed_precision")), "bfloat16"))
    if o.pop("gradient_checkpointing", None):
        result.set("model.gradient_checkpointing", True)
    if o.pop("fp8_base", None):
        o.pop("fp8_scaled", None)
        result.set("model.quantize", "fp8")
    if "output_dir" in o:
        result.set("output.dir", str(Path(str(o.pop("output_dir"))) / str(o.pop("output_name", "lora"))))
    if "max_train_epochs" in o:
        epochs = int(o.pop("max_train_epochs"))
        steps = _epochs_to_steps(epochs, result)
        if steps:
            result.set("train.max_steps", steps)
            result.skip(f"--max_train_epochs {epochs}", f"converted to train.max_steps: {steps} from the images found")
        else:
            result.skip(f"--max_train_epochs {epochs}", "set train.max_steps (the dataset folder was not readable to "
                                                        "count images)")
    if "save_every_n_epochs" in o:
        result.skip(f"--save_every_n_epochs {o.pop('save_every_n_epochs')}", "set train.save_every in steps")
    for name in sorted(o):
        if name not in QUIET:
            result.skip(f"--{name}", "no qflux equivalent")


def _epochs_to_steps(epochs: int, result: ImportResult) -> int | None:
    folder = Path(str(result.get("data.path", ""))).expanduser()
    if not folder.is_dir():
        return None
    images = sum(1 for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        return None
    batch = int(result.get("train.batch_size", 1)) * int(result.get("train.grad_accum", 1))
    return epochs * math.ceil(images / batch)
