"""Cache keys cannot go stale (issue 13 section 5): every config field is either hashed into the key or listed,
with its reason, as unable to change an entry; changing any hashed field changes the key, changing a listed one
does not; ``~`` in a path is the same key as the path it expands to.

The walk is over the pydantic schema itself, so fields added to it later are covered without touching this file.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ValidationError

from qflux.cache.keys import DERIVED, KEYED_ROOTS, NOT_IN_KEY, CacheContext, keyed_values
from qflux.config.schema import ModelConfig, QfluxConfig


def schema_leaves(model: type[BaseModel] = QfluxConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> annotation of every leaf field (nested sections walked; a list of sections is one leaf)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(schema_leaves(ann, path))
        else:
            out[path] = ann
    return out


LEAVES = schema_leaves()
KEYED = sorted(p for p in LEAVES if p.split(".")[0] in KEYED_ROOTS and p not in NOT_IN_KEY)
EXCLUDED = sorted(p for p in LEAVES if p in NOT_IN_KEY)


def digest(config: QfluxConfig, version: str = "1.0") -> str:
    return CacheContext.from_config(config, version).digest


# --------------------------------------------------------------------------- every field is classified


def test_every_config_field_is_keyed_or_listed_as_not_affecting_an_entry():
    assert len(LEAVES) > 50 and {"data.max_aspect", "data.resolution", "model.pretrained"} <= set(KEYED)
    unclassified = sorted(p for p in LEAVES if p.split(".")[0] not in KEYED_ROOTS and p not in NOT_IN_KEY)
    assert not unclassified, (
        f"config fields neither in the cache key nor in qflux/cache/keys.py NOT_IN_KEY: {unclassified}. If a "
        "field can change what a sample encodes to, put its section in KEYED_ROOTS; otherwise list it in "
        "NOT_IN_KEY with the reason")
    # what the key really hashes is exactly the keyed set (nothing listed slips in, nothing keyed is dropped)
    assert sorted(keyed_values(QfluxConfig())) == KEYED
    assert set(DERIVED) <= set(KEYED)
    for path, why in NOT_IN_KEY.items():
        assert path.split(".")[0] in LEAVES or path.split(".")[0] in QfluxConfig.model_fields, path
        assert why.strip(), f"NOT_IN_KEY[{path!r}] gives no reason"


def test_the_meta_test_catches_an_unclassified_field():
    """A new section field that nobody classified is reported (the walk sees fields added to the schema)."""

    class Extra(BaseModel):
        knob: int = 0

    class Wider(QfluxConfig):
        extra: Extra = Extra()

    leaves = schema_leaves(Wider)
    assert "extra.knob" in leaves
    assert [p for p in leaves if p.split(".")[0] not in KEYED_ROOTS and p not in NOT_IN_KEY] == ["extra.knob"]


# --------------------------------------------------------------------------- each field's effect on the key


def candidates(ann: Any, current: Any) -> list[Any]:
    """Values of type ``ann`` other than ``current`` (the schema's validators pick the valid ones)."""
    origin, args = get_origin(ann), get_args(ann)
    if hasattr(ann, "__metadata__"):  # Annotated[...] (PathStr inside a union)
        return candidates(args[0], current)
    if origin is Literal:
        return [a for a in args if a != current]
    if origin in (Union, types.UnionType):
        out = [None] if current is not None and type(None) in args else []
        for a in args:
            if a is not type(None):
                out += candidates(a, current)
        return out
    if origin is list:
        item = args[0] if args else str
        start = list(current) if isinstance(current, list) else []
        return [start + [c] for c in candidates(item, None)[:3]] + [[]]
    if origin is tuple:
        return [(32, 48), (48, 32), (64, 64)]
    if origin is dict:
        return [{"target": "image_column"}]
    if ann is bool:
        return [not current]
    if ann is int:
        base = current if isinstance(current, int) else 0
        return [base * 2, base + 16, 32, 64, 1, 2, base + 1]
    if ann is float:
        base = current if isinstance(current, (int, float)) else 0.0
        return [base * 2 + 0.5, base + 0.25, 0.5, 2.0]
    if ann is str:
        base = current if isinstance(current, str) else "x"
        return [base + "-other", "owner/other-model", "other"]
    if isinstance(ann, type) and issubclass(ann, BaseModel):  # an item of a list of sections: fill what it needs
        return [{name: candidates(f.annotation, None)[0] for name, f in ann.model_fields.items() if f.is_required()}]
    return ["other", 32, 0.5, True]


def set_path(dump: dict, path: str, value: Any) -> dict:
    out = {**dump}
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node[part] = {**node[part]}
        node = node[part]
    node[leaf] = value
    return out


def changed_config(base: QfluxConfig, path: str) -> QfluxConfig:
    """``base`` with ``path`` changed to another valid value."""
    dump = base.model_dump(mode="python")
    current = _get(base, path)
    for value in candidates(LEAVES[path], current):
        try:
            config = QfluxConfig.model_validate(set_path(dump, path, value))
        except ValidationError:
            continue
        if _get(config, path) != current:
            return config
    pytest.fail(f"no valid other value found for {path} ({LEAVES[path]}): extend candidates() in this test")


def _get(config: QfluxConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("path", KEYED)
def test_changing_a_keyed_field_changes_the_key(path):
    base = QfluxConfig()
    assert digest(changed_config(base, path)) != digest(base), f"{path} changed but the cache key did not"


@pytest.mark.parametrize("path", EXCLUDED)
def test_changing_a_field_listed_as_not_affecting_entries_keeps_the_key(path):
    """The exclusions are real: the cache survives e.g. a new learning rate or LoRA rank."""
    base = QfluxConfig()
    assert digest(changed_config(base, path)) == digest(base)


def test_max_aspect_alone_changes_the_key():
    """The review's side observation: max_aspect changes budget sizes and auto buckets, and was not hashed."""
    base = QfluxConfig()
    assert digest(base.model_copy(update={"data": base.data.model_copy(update={"max_aspect": 2.0})})) != digest(base)


def test_plugin_version_and_format_are_in_the_key():
    assert digest(QfluxConfig(), "1.0") != digest(QfluxConfig(), "1.1")


# --------------------------------------------------------------------------- ~ in paths


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model" / "vae").mkdir(parents=True)
    (tmp_path / "model" / "vae" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    return tmp_path


def _config(pretrained: str, data_path: str, validate: bool) -> QfluxConfig:
    """A config with these paths, through the schema (``validate``) or around it (a schema that keeps ``~``)."""
    if validate:
        return QfluxConfig.model_validate({"model": {"pretrained": pretrained}, "data": {"path": data_path}})
    base = QfluxConfig()
    model = base.model.model_copy(update={"pretrained": pretrained})
    data = base.data.model_copy(update={"path": data_path})
    return base.model_copy(update={"model": model, "data": data})


@pytest.mark.parametrize("validate", [True, False], ids=["schema", "raw"])
def test_tilde_paths_key_like_their_expansion_and_follow_the_folders_files(home, validate):
    tilde = _config("~/model", "~/data", validate)
    absolute = _config(str(home / "model"), str(home / "data"), validate)
    assert digest(tilde) == digest(absolute)
    # the folder is recognised as a folder behind the ~: replacing an encoder's file changes the key
    before = digest(tilde)
    config = home / "model" / "vae" / "config.json"
    config.write_text('{"scaling_factor": 2}')
    os.utime(config, ns=(1, 1))
    assert digest(tilde) != before
    # and the transformer's weights do not (they are never encoded with)
    (home / "model" / "transformer").mkdir()
    after = digest(tilde)
    (home / "model" / "transformer" / "weights.safetensors").write_bytes(b"x")
    assert digest(tilde) == after


def test_hub_and_builtin_models_key_by_name_and_revision():
    assert digest(QfluxConfig(model=ModelConfig(pretrained="a/b"))) != digest(QfluxConfig(model=ModelConfig(
        pretrained="a/b", revision="v2")))


@pytest.mark.parametrize(("a", "b"), [("kontext-dev-bf16", "kontext-dev-nf4"), ("qwen-edit-2509-bf16", "qwen-edit-2509-nf4")])
def test_the_bf16_and_nf4_recipes_share_one_cache(a, b):
    """docs/recipes.md: the entries do not depend on the quantization, so the two recipes share one cache."""
    from qflux.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert digest(load_config(configs / f"{a}.yaml")) == digest(load_config(configs / f"{b}.yaml"))
