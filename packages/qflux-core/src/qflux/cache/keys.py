"""Cache keys: a hash of everything that can change an entry's content.

key = sha256(run context digest, record fingerprint). The record fingerprint hashes the sample's input files'
bytes with their roles, and its prompt. The context digest hashes the entry format, the plugin's version and
every field of ``trainer``, ``model`` and ``data`` (``KEYED_ROOTS``) except those in ``NOT_IN_KEY``, each listed
with the reason it cannot change an entry.

Staleness is impossible by construction: a field added to ``model`` or ``data`` is in the key until someone
lists it in ``NOT_IN_KEY`` (at worst a needless re-encode, never a stale entry), and tests/cache/
test_cache_keys.py walks every field of the schema and fails for one of any other section that is not listed.
Three fields enter through a derived value (``DERIVED``): ``model.pretrained`` as the encoders' identity (a
folder's file stamps, so replaced weights re-encode; ``qflux.model_source.ModelSource`` says what is a folder,
``~`` expanded), ``data.caption_dropout`` as whether the empty prompt is encoded and ``data.reference_dropout`` as
whether the prompts of the control subsets are. A leading ``~`` is expanded in every keyed string, whether or not
the schema already did.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from qflux.config.schema import QfluxConfig
from qflux.model_source import ModelSource

CACHE_FORMAT = 2  # 2: controls share the target's crop and get the pipeline's condition sizes (data.resize)

# Top-level config keys whose every field is part of the key unless listed below.
KEYED_ROOTS = ("trainer", "model", "data")

# Every config field that cannot change an encoded entry (dotted path -> why). Fields of sections outside
# KEYED_ROOTS must each be listed here (the meta-test says which are missing); list one of model/data only when
# certain: an unlisted field merely re-encodes when it changes.
NOT_IN_KEY: dict[str, str] = {
    # model: what is loaded and how the transformer trains; the encoders see none of it
    "model.quantize": "quantizes the transformer only (Quantizer.quantize after Trainer.load_transformer)",
    "model.quantize_skip": "a quantize option",
    "model.gradient_checkpointing": "the transformer's backward pass",
    "model.offload_blocks": "where the transformer's block weights live between uses (numerically the same)",
    "model.adapter": "the adapter kind attached to the transformer",
    "model.adapter_options": "the options of that adapter",
    "model.lora.rank": "the LoRA on the transformer",
    "model.lora.alpha": "the LoRA on the transformer",
    "model.lora.targets": "the LoRA on the transformer",
    "model.lora.init": "the LoRA on the transformer",
    "model.lora.dropout": "the LoRA on the transformer",
    "model.lora.dora": "the LoRA on the transformer",
    "model.lora.rslora": "the LoRA on the transformer",
    # data: which samples train and how they are read, not what one encodes to
    "data.holdout": "which samples are held out; both kinds are encoded alike",
    "data.workers": "how many processes decode the images",
    "data.allow_no_controls": "whether a dataset without controls is accepted; the roles are in the fingerprint",
    "data.mixed_controls": "a data check (whether samples may carry different numbers of controls); the roles are "
                           "in the fingerprint",
    # cache: where entries live and whether they are used
    "cache.enabled": "whether the cache is used",
    "cache.dir": "where the entries live",
    # train: the optimisation of the LoRA; entries are its inputs
    "train.max_steps": "optimisation",
    "train.batch_size": "optimisation (encoding runs in chunks of its own size)",
    "train.grad_accum": "optimisation",
    "train.lr": "optimisation",
    "train.optimizer": "optimisation",
    "train.optimizer_args": "optimisation",
    "train.weight_decay": "optimisation",
    "train.scheduler": "optimisation",
    "train.warmup_steps": "optimisation",
    "train.timestep_sampling": "noise is drawn per step, after the cache",
    "train.logit_mean": "noise is drawn per step, after the cache",
    "train.logit_std": "noise is drawn per step, after the cache",
    "train.shift": "noise is drawn per step, after the cache",
    "train.mixed_precision": "autocast of the training step; entries are stored in model.dtype",
    "train.seed": "noise, dropout and order are drawn per step, after the cache",
    "train.compile": "how the transformer's forward runs (compiled or eager)",
    "train.compile_backend": "how the transformer's forward runs (compiled or eager)",
    "train.save_every": "checkpointing",
    "train.keep_checkpoints": "checkpointing",
    "train.max_grad_norm": "optimisation",
    "train.log_every": "logging",
    "train.fsdp": "how the transformer is sharded",
    "train.collective_timeout": "how long the process group waits for a rank",
    "train.ema": "an average of the trained weights, kept beside them",
    # loss: applied to the prediction; the entry holds the token mask it weights
    "loss.mask_weighting.foreground": "a loss weight, applied per step",
    "loss.mask_weighting.background": "a loss weight, applied per step",
    # validation and output: what the run shows and writes
    "validation.every": "validation",
    "validation.steps": "validation sampling",
    "validation.seed": "validation sampling",
    "validation.vae_tiling": "how validation images are decoded",
    "validation.true_cfg": "validation sampling",
    "validation.samples": "validation sampling (its images are encoded by the sampling pipeline, never cached)",
    "validation.from_holdout": "which held-out samples are also rendered",
    "validation.select_best": "which checkpoint is exported as the best",
    "output.dir": "where the run writes",
}


def _pretrained(config: QfluxConfig) -> str:
    return encoder_identity(ModelSource.of(config.model))


def _empty_prompt(config: QfluxConfig) -> bool:
    return config.data.caption_dropout > 0  # only whether the empty prompt is encoded, not how often it is used


def _subset_prompts(config: QfluxConfig) -> bool:
    # only whether the prompts of the control subsets are encoded (a trainer with TrainerInfo.prompt_sees_controls,
    # training.encoding.encode_with_subset_prompts), not how often references drop. The key does not know the
    # trainer's flag: for a trainer without it, toggling p between 0 and > 0 re-encodes its entries once, needlessly
    return config.data.reference_dropout > 0


# Keyed fields that enter through a value derived from the config (the raw value is not hashed).
DERIVED: dict[str, Callable[[QfluxConfig], Any]] = {
    "model.pretrained": _pretrained,  # the folder's file stamps: weights replaced in place re-encode
    "data.caption_dropout": _empty_prompt,
    "data.reference_dropout": _subset_prompts,
}


def _expand(value: Any) -> Any:
    """``~`` expanded in every string (``~/m`` and ``/home/me/m`` are one key, schema expansion or not)."""
    if isinstance(value, str):
        return os.path.expanduser(value) if value.startswith("~") else value
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _fields(model: BaseModel, prefix: str) -> dict[str, Any]:
    """Dotted path -> value of every leaf field of ``model`` (nested sections walked, lists kept whole)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        path = f"{prefix}.{name}" if prefix else name
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_fields(value, path))
        else:
            out[path] = value
    return out


def keyed_values(config: QfluxConfig) -> dict[str, Any]:
    """The config fields the context digest hashes (dotted path -> JSON value)."""
    out: dict[str, Any] = {}
    for path, value in _fields(config, "").items():
        if path.split(".")[0] not in KEYED_ROOTS or path in NOT_IN_KEY:
            continue
        out[path] = DERIVED[path](config) if path in DERIVED else _expand(to_jsonable_python(value))
    return out


@dataclass(frozen=True)
class CacheContext:
    """The part of a key shared by every sample of a run (computed once)."""

    digest: str

    @classmethod
    def from_config(cls, config: QfluxConfig, plugin_version: str) -> CacheContext:
        parts = {"format": CACHE_FORMAT, "plugin_version": plugin_version, "config": keyed_values(config)}
        return cls(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest())


def encoder_identity(source: ModelSource) -> str:
    """An existing folder (``source.path``, ``~`` expanded): its resolved path plus names, sizes and mtimes of
    every file outside ``transformer/`` (the encoders, VAE, tokenizers; re-hashing many GB of weights at every
    start would cost minutes). A hub id, builtin name or missing folder: the value as given plus the revision."""
    path = source.path
    if path is None or not path.is_dir():
        return f"{source.pretrained}@{source.revision or 'main'}"
    h = hashlib.sha256(str(path.resolve()).encode())
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if not (Path(root) == path and x == "transformer"))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def entry_key(context: CacheContext, record_fingerprint: str) -> str:
    return hashlib.sha256(f"{context.digest}:{record_fingerprint}".encode()).hexdigest()[:40]
