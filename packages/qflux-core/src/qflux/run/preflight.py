"""Checks that a run can start, made before it writes anything (``qflux train``, ``qflux cache``).

A training run is hours of GPU time: every mistake that can be found without loading a model is found here,
in order of cost, and reported as one ``UserError`` (exit code 2) naming the key or file and the fix; the run
then leaves nothing behind (no ``output.dir``, no cache folder). What is checked (docs/errors.md):

1. the trainer and the quantizer are installed; the optimizer and the LR scheduler exist and accept
   ``train.optimizer_args``; the ``data:`` settings agree (``data.resize`` and the form of ``data.resolution``);
2. ``model.pretrained``: a local folder exists, holds every component its ``model_index.json`` lists, and its
   components are of the classes the trainer's pipeline needs (a folder of another model family);
   ``model.lora.targets`` name modules of its transformer (built on the meta device: no weights read);
3. ``output.dir`` and ``cache.dir`` can be created and written; no other run holds ``output.dir`` (its lock,
   ``qflux.run.lock``; probed here, taken by the run); ``output.dir`` holds no run unless resuming;
   the checkpoint to resume from is intact and was written with the same config (the keys that differ are
   named);
4. the images of ``validation.samples`` exist and decode (1, 2 and 4 are ``check_config``: all of ``qflux
   config check``, and the first part of ``qflux data check``);
5. the dataset: everything ``qflux data check`` reports is fatal (``qflux.data.check.validate_dataset``);
6. memory: the run's plan (``qflux plan``) fits the accelerator's free memory, or without one the host's
   available RAM; ``model.offload_blocks: auto`` becomes the smallest count that fits (``qflux.plan.check``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError, UserError
from qflux.layout import LORA_FILE
from qflux.plugins import Registry
from qflux.trainer import Trainer
from qflux.training.fingerprint import config_fingerprint, differing_keys


def check_config(config: QfluxConfig, registry: Registry, need_plugins: bool = True) -> None:
    """The checks of ``config`` that read no data: all of ``qflux config check``, the first part of ``qflux
    train`` and ``qflux data check`` (one list, so no check approves what ``train`` refuses). With
    ``need_plugins=False`` (``data check`` works without the trainer's package) a trainer or quantizer that is
    not installed skips the checks that need it instead of failing."""
    from qflux.run.lora_targets import check_lora_targets
    from qflux.training.best import check_select_best
    from qflux.training.compile import check_compile
    from qflux.training.optim import check_optimizer, check_scheduler
    from qflux.training.sharding import check_fsdp

    trainer = check_plugins(config, registry, need_plugins)
    check_fsdp(config)
    check_optimizer(config.train)
    check_scheduler(config.train)
    check_compile(config.train)
    check_data_settings(config)
    if trainer is not None:
        check_model_source(config, trainer.info.pipeline, trainer.name)
        check_lora_targets(config, trainer)
        check_offload_blocks(config, registry, trainer)
    check_validation_images(config)
    check_select_best(config)


def check_offload_blocks(config: QfluxConfig, registry: Registry, trainer: Trainer) -> None:
    """``model.offload_blocks``: not negative, not beyond the transformer's repeated blocks (counted on the
    meta-device model), not with a quantizer, train.fsdp or train.compile it cannot work with."""
    from qflux.run.lora_targets import meta_transformer
    from qflux.training.offload import check_offload, meta_block_count

    quantizer = registry.quantizer(config.model.quantize) if config.model.quantize in registry.quantizers else None
    check_offload(config, quantizer, lambda: meta_block_count(meta_transformer(config, trainer)))


def check_plugins(config: QfluxConfig, registry: Registry, need_plugins: bool = True) -> Trainer | None:
    """The trainer, quantizer and adapter of ``config`` are installed and accept their options; the trainer
    accepts the config (``Trainer.check``). Returns the trainer (None when it may be missing and is)."""
    from qflux.config.load import validate_options

    trainer = registry.trainer(config.trainer) if need_plugins or config.trainer in registry.trainers else None
    if config.model.quantize and (need_plugins or config.model.quantize in registry.quantizers):
        registry.quantizer(config.model.quantize)
    adapter = registry.adapter(config.model.adapter)
    if config.model.adapter_options and adapter.name == "lora":
        raise ConfigError("model.adapter_options: the lora adapter takes its options from model.lora; "
                          "move them there")
    if adapter.name != "lora":
        validate_options(adapter.Options, config.model.adapter_options, "model.adapter_options",
                         f"the {adapter.name} adapter")
    adapter.check(adapter.options_of(config.model), None)
    if trainer is None:
        return None
    if trainer.Options is not None:
        validate_options(trainer.Options, config.model.options, "model.options", f"the {trainer.name} trainer")
    elif config.model.options:
        raise ConfigError(f"model.options: the {trainer.name} trainer takes no options (got "
                          f"{', '.join(sorted(config.model.options))})")
    trainer.check(config)
    return trainer


def check_capabilities(config: QfluxConfig, trainer: Trainer, command: str = "qflux train") -> None:
    """The stages ``command`` will call are implemented by the trainer (one line, exit 2, before any work)."""
    if command == "qflux sample":
        trainer.require("load_transformer", "load_encoders", "sample", why="qflux sample")
        return
    trainer.require("load_encoders", "encode", why=command)
    if command == "qflux train":
        trainer.require("load_transformer", "predict", why=command)
        if config.validation.every and (config.validation.samples or config.validation.from_holdout):
            trainer.require("sample", why="validation sampling (validation.every with samples or from_holdout; "
                                          "set validation.every: 0 or drop them)")


def check_data_settings(config: QfluxConfig) -> None:
    """``data:`` settings that contradict each other (found by planning one size: the rule ``train`` uses)."""
    from qflux.data.resize import plan_size

    plan_size(64, 64, config.data)


def check_run(config: QfluxConfig, registry: Registry, resume: bool | Path = False) -> list[Any]:
    """Everything ``qflux train`` can check before it writes anything (see the module docstring). Returns the
    dataset's records, checked: the run takes them (``train(records=...)``) instead of scanning again, and
    their fingerprints, computed here for the cache probe, are not computed again."""
    from qflux.training.launch import check_world_size

    check_world_size()  # `accelerate launch --cpu --num_processes N` started one process: say so first
    check_config(config, registry)
    check_capabilities(config, registry.trainer(config.trainer))
    if config.model.quantize:  # a missing bitsandbytes is found now, not after hours of encoding
        registry.quantizer(config.model.quantize).check(config.model)
    check_output(config, resume, registry.adapter(config.model.adapter).file_name)
    if config.cache.enabled:
        check_writable(Path(config.cache.dir), "cache.dir")
    from qflux.plan.check import check_memory

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    check_memory(config, registry, None, world)  # one reference per sample: a run that cannot fit even so
    records = check_data(config, registry)  # is refused before the dataset is read at its resolution
    if check_memory_again(records):
        check_memory(config, registry, records, world)
    return records


def check_memory_again(records: list[Any]) -> bool:
    """Samples with more than one control: the plan grows with the references, so it is made again."""
    return any(len(getattr(r, "controls", ()) or ()) > 1 for r in records or ())


def check_cache_run(config: QfluxConfig, registry: Registry) -> list[Any]:
    """What ``qflux cache`` (build) can check before it writes anything; returns the checked records."""
    if not config.cache.enabled:
        raise ConfigError("cache.enabled is false: set it to true (--set cache.enabled=true) to build the cache")
    trainer = check_plugins(config, registry)
    check_capabilities(config, trainer, "qflux cache")
    check_data_settings(config)
    check_model_source(config, trainer.info.pipeline, trainer.name)
    check_writable(Path(config.cache.dir), "cache.dir")
    return check_data(config, registry)


# --------------------------------------------------------------------------- folders


def _nearest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_writable(path: Path, key: str) -> None:
    """``ConfigError`` naming ``key`` when ``path`` cannot be created or written (a file in the way, a
    read-only file system, no permission). Creates nothing."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder; set {key} to a folder")
    probe = _nearest_existing(path)
    if not probe.is_dir():
        raise ConfigError(f"{key}: cannot create {path}: {probe} is a file, not a folder; set {key} to a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write to {probe} (read-only file system or no permission); "
                          f"set {key} to a writable folder")


# --------------------------------------------------------------------------- model


def _component_class(folder: Path) -> str | None:
    """The class a component folder holds: ``_class_name`` (diffusers) or ``architectures[0]`` (transformers)."""
    for name in ("config.json", "scheduler_config.json"):
        file = folder / name
        if file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise UserError(f"model.pretrained: {file} is not valid JSON ({err}); re-download the model") from err
            if not isinstance(config, dict):
                return None
            if config.get("_class_name"):
                return str(config["_class_name"])
            arch = config.get("architectures")
            return str(arch[0]) if isinstance(arch, list) and arch else None
    return None


def _pipeline_needs(pipeline: str) -> dict[str, str]:
    """Component name -> class name of the torch modules the diffusers pipeline ``pipeline`` (import path)
    takes (optional components excluded). Imports the pipeline: only called when a folder looks wrong."""
    import importlib

    import torch

    module, _, name = pipeline.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        types = cls._get_signature_types()
        optional = set(getattr(cls, "_optional_components", []) or [])
    except Exception:  # noqa: BLE001 - a pipeline that cannot be inspected: no family check
        return {}
    needs = {}
    for component, candidates in types.items():
        if component in optional:
            continue
        classes = [c for c in candidates if isinstance(c, type) and issubclass(c, torch.nn.Module)]
        if classes:
            needs[component] = classes[0].__name__
    return needs


def check_model_source(config: QfluxConfig, pipeline: str, trainer: str) -> None:
    """A local ``model.pretrained`` folder: it exists, holds every component ``model_index.json`` lists, and
    its components are of the classes the trainer's pipeline needs. Hub ids and ``builtin:`` names are left
    to the trainer's loader."""
    from qflux.model_source import ModelSource

    found = ModelSource.of(config.model)
    source, path = found.pretrained, found.path
    if path is None:  # a hub id or a builtin: left to the loader
        return
    if not path.exists():
        raise ConfigError(f"model.pretrained: folder {source} does not exist; set it to a diffusers folder, "
                          "a hub id (OWNER/NAME) or builtin:tiny")
    if not path.is_dir():
        raise ConfigError(f"model.pretrained: {source} is a file; set it to a diffusers folder (the one holding "
                          "model_index.json), a hub id or builtin:tiny")
    index_file = path / "model_index.json"
    declared: dict[str, str] = {}
    pipeline_name = ""
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"model.pretrained: {index_file} is not valid JSON ({err}); re-download the model") from err
        pipeline_name = str(index.get("_class_name", ""))
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
                continue
            declared[name] = str(value[1])
            if not (path / name).is_dir():
                raise UserError(f"model.pretrained {source} is missing the component '{name}': model_index.json "
                                f"lists it but {path / name}/ does not exist; re-download the model folder")
    found = {name: _component_class(path / name) for name in declared}
    inconsistent = any(found[n] is not None and found[n] != declared[n] for n in declared)
    if not inconsistent and (not pipeline_name or pipeline_name == pipeline.rpartition(".")[2]):
        return
    needs = _pipeline_needs(pipeline)
    wanted = pipeline.rpartition(".")[2]
    what = f" but a {pipeline_name} folder (model_index.json)" if pipeline_name and pipeline_name != wanted else ""
    fix = "use a folder of the model this trainer trains, or the trainer of this model (--trainer)"
    for name in sorted(needs, key=lambda n: (n != "transformer", n)):  # the transformer says the most
        folder, expected = path / name, needs[name]
        if not folder.is_dir():
            raise UserError(f"model.pretrained {source} is not a {wanted} folder{what}: it has no {name}/ (the "
                            f"{trainer} trainer needs {expected} there); {fix}")
        actual = _component_class(folder)
        if actual is not None and actual != expected:
            raise UserError(f"model.pretrained {source} is not a {wanted} folder{what}: {name}/ holds {actual} "
                            f"({folder / 'config.json'}), the {trainer} trainer needs {expected}; {fix}")


# --------------------------------------------------------------------------- output and resume


def _differing_keys(checkpoint: Path, config: QfluxConfig, fingerprint: Callable[[QfluxConfig], str],
                    expected: str) -> list[str]:
    """``key: old -> new`` for the resume-relevant keys where the run that wrote ``checkpoint`` (its
    ``config.yaml``) and ``config`` differ; empty when that cannot be told reliably."""
    import yaml

    run_config = checkpoint.parent.parent / "config.yaml"
    try:
        old = QfluxConfig.model_validate(yaml.safe_load(run_config.read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - no readable config of the old run: no names, the message stays generic
        return []
    if fingerprint(old) != expected:  # config.yaml is not the config of that checkpoint
        return []
    return differing_keys(old, config)


def check_output(config: QfluxConfig, resume: bool | Path = False, adapter_file: str = LORA_FILE) -> None:
    """``output.dir`` is writable, not in use by another run (its lock, asked by the main process only) and
    holds no run unless resuming; a resume has a checkpoint to continue (``qflux.training.run_folder``),
    intact, of the same config (the differing keys named), changes no setting a resume cannot apply
    (``qflux.training.resume``), and is not past ``train.max_steps`` unexported."""
    from qflux.run.lock import check_free, main_process
    from qflux.training.run_folder import remaining_work, resume_point

    output = Path(config.output.dir)
    check_writable(output, "output.dir")
    if main_process():  # the other ranks of a launch share the main process's run (and its lock)
        check_free(output)
    if isinstance(resume, Path):
        _check_usable_checkpoint(resume)
    path = resume_point(output, resume, lambda message: None, adapter_file)
    if path is None:
        return
    state = _checkpoint_state(path)
    check_same_config(path, str(state.get("config_fingerprint")), config)
    _check_resume_settings(path, config)
    remaining_work(output, path, int(state.get("step", 0)), config.train.max_steps, adapter_file)


def _check_usable_checkpoint(path: Path) -> None:
    from qflux.training import checkpoint as ckpt

    problem = ckpt.verify(path)
    if problem is not None:
        raise UserError(f"--resume-from {path}: not a usable checkpoint ({problem}); pick a folder "
                        f"checkpoints/step-NNNNNN/ of a run")


def _checkpoint_state(path: Path) -> dict[str, Any]:
    from qflux.training import checkpoint as ckpt

    try:
        state = json.loads((path / ckpt.STATE).read_text(encoding="utf-8"))
        str(state["config_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint {path}: unreadable {ckpt.STATE} ({err})") from err
    return state


def check_same_config(path: Path, written_with: str, config: QfluxConfig) -> None:
    """The fingerprinted settings (model, data, batch) are those the checkpoint was written with."""
    if written_with == config_fingerprint(config):
        return
    keys = _differing_keys(path, config, config_fingerprint, written_with)
    changed = ("; changed: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")) if keys else \
        " (model, data or batch settings changed)"
    raise UserError(f"checkpoint {path} was written with a different config{changed}; resume with the "
                    "original config (its output.dir/config.yaml) or start a new output.dir")


def _check_resume_settings(path: Path, config: QfluxConfig) -> None:
    """No setting changed that a resume cannot apply (the others are applied and listed by the loop)."""
    from qflux.training.resume import previous_settings, refuse_fixed, settings_changes

    refuse_fixed(settings_changes(previous_settings(path), config), path)


# --------------------------------------------------------------------------- images and data


def check_validation_images(config: QfluxConfig) -> None:
    """Every image of ``validation.samples`` exists and decodes (when validation sampling is on)."""
    from qflux.data.images import open_rgb
    from qflux.data.records import FileImage
    from qflux.errors import DataError

    if not config.validation.every:
        return
    for i, spec in enumerate(config.validation.samples):
        files = [(f"validation.samples[{i}].control[{j}]", c) for j, c in enumerate(spec.control)]
        if spec.target:
            files.append((f"validation.samples[{i}].target", spec.target))
        for key, file in files:
            if not Path(file).is_file():
                raise ConfigError(f"{key}: image not found: {file} (relative paths start at the current folder "
                                  f"{Path.cwd()})")
            try:
                open_rgb(FileImage(Path(file)), "validation")
            except DataError as err:
                raise ConfigError(f"{key}: {err}") from err


def check_data(config: QfluxConfig, registry: Registry) -> list[Any]:
    """Every problem ``qflux data check`` reports is fatal; records with a cache entry are not decoded again.
    Returns the records."""
    from qflux.data.check import validate_dataset

    trainer = registry.trainer(config.trainer)
    decoded = _cached_predicate(config, registry)
    records = validate_dataset(config.data, max_controls=trainer.info.max_controls, decoded=decoded,
                               needs_controls=trainer.info.needs_controls)
    if config.data.holdout and len(records) < 2:
        raise ConfigError(f"data.holdout={config.data.holdout} needs at least 2 samples, the dataset has "
                          f"{len(records)}: add samples or set data.holdout: 0")
    return records


def _cached_predicate(config: QfluxConfig, registry: Registry) -> Callable[[Any], bool] | None:
    """``record -> bool``: whether a cache entry of the record exists (read from the index; creates nothing)."""
    root = Path(config.cache.dir)
    if not config.cache.enabled or not (root / "index.jsonl").is_file():
        return None
    from qflux.cache.keys import CacheContext, entry_key
    from qflux.cache.store import EmbeddingCache

    try:
        cache = EmbeddingCache(root)
        context = CacheContext.from_config(config, registry.version_of_trainer(config.trainer))
    except (OSError, ValueError):
        return None

    def cached(record: Any) -> bool:
        try:
            return entry_key(context, record.fingerprint()) in cache
        except Exception:  # noqa: BLE001 - unreadable bytes: decode it and report the file
            return False

    return cached
