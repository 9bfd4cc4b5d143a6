"""Load a ``QfluxConfig`` from YAML, apply ``--set a.b=value`` overrides, explain every error by key path."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """``["train.lr=1e-4"]`` -> ``[(["train", "lr"], 0.0001)]``; the value is parsed as YAML."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    data = read_yaml(Path(path)) if path is not None else {}
    apply_overrides(data, parse_overrides(list(overrides)))
    if trainer is not None:
        data["trainer"] = trainer
    return validate(data, source)


def validate(data: dict[str, Any], source: str) -> QfluxConfig:
    try:
        return QfluxConfig.model_validate(data)
    except ValidationError as err:
        lines = [explain(e) for e in err.errors()]
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(f"  - {line}" for line in lines)) from err


def explain(error: dict[str, Any]) -> str:
    """One line per pydantic error: the dotted key, what is wrong, and a hint when there is one."""
    loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    key = _dotted(loc)
    if error["type"] == "extra_forbidden":
        hint = _did_you_mean(loc)
        return f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if error["type"] == "missing":
        return f"'{key}' is required"
    got = error.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"'{key}': {error['msg']}{got_text}"


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _did_you_mean(loc: list[str]) -> str | None:
    """Closest allowed key at the same level (or the same key in another section)."""
    model: type[BaseModel] | None = QfluxConfig
    for part in loc[:-1]:
        if part.isdigit() or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field else None
    bad = loc[-1]
    prefix = ".".join(p for p in loc[:-1] if not p.isdigit())
    if model is not None:
        match = difflib.get_close_matches(bad, list(model.model_fields), n=1, cutoff=0.6)
        if match:
            return f"{prefix}.{match[0]}" if prefix else match[0]
    for section, field in QfluxConfig.model_fields.items():  # a key put in the wrong section
        sub = _model_of(field.annotation)
        if sub is not None and bad in sub.model_fields:
            return f"{section}.{bad}"
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None
