"""Load a ``QfluxConfig`` from YAML, apply ``--set a.b=value`` overrides, explain every error by key path."""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2; PyYAML's 1.1 rules want ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9_]{6,}")

# Keys users bring from ai-toolkit, musubi-tuner, kohya and diffusers scripts, and the qflux key they mean:
# closeness of spelling points the wrong way for these (``train.steps`` is closest to ``validation.steps``).
# Looked up by the whole dotted key first, then by its last part.
KEY_HINTS: dict[str, str] = {
    "train.steps": "train.max_steps",
    "steps": "train.max_steps",
    "output_dir": "output.dir",
    "output_path": "output.dir",
    "training_folder": "output.dir",
    "learning_rate": "train.lr",
    "unet_lr": "train.lr",
    "network": "model.lora",
    "lora": "model.lora",
    "network_dim": "model.lora.rank",
    "linear": "model.lora.rank",
    "network_alpha": "model.lora.alpha",
    "linear_alpha": "model.lora.alpha",
    "target_modules": "model.lora.targets",
    "folder_path": "data.path",
    "dataset": "data.path",
    "image_directory": "data.path",
    "train_data_dir": "data.path",
    "name_or_path": "model.pretrained",
    "pretrained_model_name_or_path": "model.pretrained",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler": "train.scheduler",
    "lr_warmup_steps": "train.warmup_steps",
    "caption_dropout_rate": "data.caption_dropout",
    "cache_dir": "cache.dir",
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """``["train.lr=1e-4"]`` -> ``[(["train", "lr"], 0.0001)]``; the value is parsed as YAML."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        try:
            value = _load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({err.problem})") from err
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Set each dotted key in the nested dict ``data`` (intermediate sections are created)."""
    for path, value in overrides:
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (trainer:, model:, ...)")
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), trainer: str | None = None) -> QfluxConfig:
    """Read ``path`` (None: defaults only), apply overrides (``--trainer`` last) and validate."""
    source = str(path) if path is not None else "defaults"
    data = read_yaml(Path(path).expanduser()) if path is not None else {}
    apply_overrides(data, parse_overrides(list(overrides)))
    if trainer is not None:
        data["trainer"] = trainer
    return validate(data, source)


# Keys that moved into a trainer's own options (``model.options``, validated by its ``Trainer.Options``): the
# old key, its old default (a config that kept it says nothing new: dropped), and the option it became.
MOVED_TO_OPTIONS = {
    ("model", "guidance"): (1.0, "guidance"),
    ("validation", "guidance"): (2.5, "sample_guidance"),
}


def migrate(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Old keys rewritten to where they live now, each with a ``ConfigDeprecation`` warning."""
    import warnings

    from qflux.errors import ConfigDeprecation

    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (section, key), (old_default, option) in MOVED_TO_OPTIONS.items():
        values = data.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        model = data.setdefault("model", {}) if isinstance(data.get("model", {}), dict) else None
        if model is None:
            continue
        if value != old_default:
            options = dict(model.get("options") or {})
            options.setdefault(option, value)
            model["options"] = options
        warnings.warn(f"{source}: {section}.{key} is now the trainer's option model.options.{option} "
                      f"(docs/config.md); {'moved there' if value != old_default else 'its default, dropped'}",
                      ConfigDeprecation, stacklevel=3)
    return data


def validate(data: dict[str, Any], source: str) -> QfluxConfig:
    from qflux.known import canonical_trainer

    data = migrate(data, source)
    if isinstance(data.get("trainer"), str):  # a dated alias (qwen-edit-2509) is saved under its trainer's name
        data = {**data, "trainer": canonical_trainer(data["trainer"])}
    try:
        return QfluxConfig.model_validate(data)
    except ValidationError as err:
        lines = list(dict.fromkeys(explain(e, data) for e in err.errors()))  # a union fails once per member: dedupe
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(f"  - {line}" for line in lines)) from err


# The one-line rule for data.resolution, whatever form the wrong value has (pydantic gives one line per member
# of the union and per list item).
RESOLUTION_RULE = ("expected one int (a square's pixel budget, e.g. 512), [h, w] (a fixed size, e.g. [512, 768]) "
                   "or a list of [h, w] buckets (e.g. [[512, 512], [512, 768]])")


def explain(error: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    """One line per pydantic error: the dotted key, what is wrong, and a hint when there is one."""
    loc, union = _clean_loc(error["loc"])
    key = _dotted(loc)
    if error["type"] == "extra_forbidden":
        if "token" in loc[-1].lower() and "token" not in key.rpartition(".")[0]:
            return (f"unknown key '{key}': qflux never reads a Hugging Face token from a config (the resolved "
                    "config is saved as output.dir/config.yaml); remove it, set the HF_TOKEN environment variable "
                    "or run `hf auth login`")
        hints = _did_you_mean(loc)
        return f"unknown key '{key}'" + (f" (did you mean {' or '.join(repr(h) for h in hints)}?)" if hints else "")
    if error["type"] == "missing":
        return f"'{key}' is required"
    got = error.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    if isinstance(got, str) and _TOKEN_RE.search(got):  # never echo a credential pasted into the wrong key
        got_text = " (got a value that looks like a Hugging Face token: not shown; tokens belong in HF_TOKEN)"
    if error["type"] == "value_error":  # our own validators: their message names the value and the fix
        return f"'{key}': {str(error['msg']).removeprefix('Value error, ')}"
    if key == "data.resolution":
        return f"'{key}': {RESOLUTION_RULE} (got {_raw_resolution(error, data)!r})"
    if union is not None:
        members = [_type_name(a) for a in get_args(union) if a is not type(None)]
        return f"'{key}': expected {', '.join(members[:-1])} or {members[-1]}{got_text}"
    return f"'{key}': {error['msg']}{got_text}"


def _raw_resolution(error: dict[str, Any], data: dict[str, Any] | None) -> Any:
    """The whole value the user gave for data.resolution (pydantic's error may hold only one list item)."""
    section = (data or {}).get("data")
    return section["resolution"] if isinstance(section, dict) and "resolution" in section else error.get("input")


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _clean_loc(raw: tuple[Any, ...]) -> tuple[list[str], Any]:
    """The config key path of a pydantic error location, without the union-member tags pydantic inserts.

    Returns the path and, when the error is about one member of a union-typed key, that union annotation.
    """
    out: list[str] = []
    ann: Any = QfluxConfig
    for item in raw:
        part = str(item)
        if part.startswith(("function-", "tagged-union")):
            continue
        ann = _strip_optional(ann)
        if _is_union(ann):
            return out, ann
        out.append(part)
        ann = _child(ann, part)
    return out, None


def _child(ann: Any, part: str) -> Any:
    """The annotation one step down ``part`` (a field, a list index, a dict key); None when unknown."""
    ann = _strip_optional(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        field = ann.model_fields.get(part)
        return field.annotation if field else None
    origin, args = get_origin(ann), get_args(ann)
    if origin is list and args:
        return args[0]
    if origin is tuple and args:
        return args[0] if args[-1] is Ellipsis or not part.isdigit() else args[min(int(part), len(args) - 1)]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType) and len([a for a in get_args(ann) if a is not type(None)]) > 1


def _strip_optional(ann: Any) -> Any:
    if get_origin(ann) in (Union, types.UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return ann


def _type_name(ann: Any) -> str:
    return ann.__name__ if isinstance(ann, type) and not get_args(ann) else str(ann).replace("typing.", "")


def _all_keys(model: type[BaseModel] = QfluxConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (not the keys inside list items)."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        keys.append(path)
        sub = _strip_optional(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += _all_keys(sub, path)
    return keys


def _did_you_mean(loc: list[str]) -> list[str]:
    """Suggestions for the unknown key ``loc``: the same key in another section first, then the closest key
    at the same level, then the closest key anywhere."""
    parent, bad = loc[:-1], loc[-1]
    here = _dotted(parent)
    hint = KEY_HINTS.get(_dotted(loc)) or KEY_HINTS.get(bad)
    if hint and hint != _dotted(loc):
        return [hint]
    elsewhere = [k for k in _all_keys() if k.rpartition(".")[2] == bad and k.rpartition(".")[0] != here]
    if elsewhere:
        return elsewhere
    ann: Any = QfluxConfig
    for part in parent:
        ann = _child(ann, part)
    ann = _strip_optional(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        match = difflib.get_close_matches(bad, list(ann.model_fields), n=1, cutoff=0.6)
        if match:
            return [f"{here}.{match[0]}" if here else match[0]]
    by_leaf: dict[str, list[str]] = {}
    for k in _all_keys():
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    match = difflib.get_close_matches(bad, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else []


def validate_options(options_model: type[BaseModel], raw: dict[str, Any], key: str, owner: str) -> BaseModel:
    """A plugin's own keys (``model.options`` of a trainer, ``model.adapter_options`` of an adapter) validated
    by its pydantic model, errors explained like the core's: the dotted key, what is wrong, did you mean."""
    try:
        return options_model.model_validate(raw)
    except ValidationError as err:
        known = list(options_model.model_fields)
        lines = []
        for error in err.errors():
            loc = [str(p) for p in error["loc"]]
            dotted = ".".join([key, *loc])
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
                hint = f"did you mean '{key}.{close[0]}'? " if close else ""
                lines.append(f"unknown key '{dotted}' ({hint}{owner} takes: {', '.join(known) or 'no keys'})")
            else:
                got = error.get("input")
                got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
                lines.append(f"'{dotted}': {str(error['msg']).removeprefix('Value error, ')}{got_text}")
        raise ConfigError("invalid config\n" + "\n".join(f"  - {line}" for line in dict.fromkeys(lines))) from err
