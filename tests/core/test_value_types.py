"""Parse-once value types (issue 15 item 8): ``ResolutionSpec`` (``data.resolution`` with ``data.resize``) and
``ModelSource`` (``model.pretrained``) give the answers the per-reader isinstance ladders and path guesses
gave before them. The ``_old_*`` functions are those readers as they were (copied verbatim), kept here as the
oracle; ``~`` in a model folder keys the cache by the folder's files."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from qflux.cache.keys import CacheContext, encoder_identity, keyed_values
from qflux.config.resolution import ResolutionSpec
from qflux.config.schema import DataConfig, ModelConfig, QfluxConfig
from qflux.data.resize import (
    auto_buckets,
    budget_size,
    closest_bucket,
    default_size,
    nominal_area,
    plan_size,
    resize_mode,
)
from qflux.data.shapes import sample_size
from qflux.errors import ConfigError, UserError
from qflux.model_source import TINY_ID, ModelSource, resolve_source
from qflux.training.validation import _default_size

# --------------------------------------------------------------------------- the old readers (the oracle)


def _old_resize_mode(data):
    if data.resize is not None:
        return data.resize
    if isinstance(data.resolution, int):
        return "budget"
    if isinstance(data.resolution, tuple):
        return "fixed"
    return "buckets"


def _old_nominal_area(data):
    res = data.resolution
    if isinstance(res, int):
        return res * res
    if isinstance(res, tuple):
        return res[0] * res[1]
    return max(h * w for h, w in res)


def _old_plan_size(width, height, data):
    mode = _old_resize_mode(data)
    res = data.resolution
    if mode == "fixed":
        if isinstance(res, int):
            return res, res
        if isinstance(res, tuple):
            return int(res[1]), int(res[0])
        if len(res) == 1:
            return int(res[0][1]), int(res[0][0])
        raise ConfigError("data.resize: 'fixed' needs data.resolution as an int or [h, w], not a list of buckets")
    if mode == "budget":
        if isinstance(res, list) and len(res) != 1:
            raise ConfigError("data.resize: 'budget' needs data.resolution as an int or [h, w], not a list of buckets")
        return budget_size(width, height, _old_nominal_area(data), data.max_aspect)
    if isinstance(res, int):
        return closest_bucket(width, height, auto_buckets(res, data.max_aspect))
    if isinstance(res, tuple):
        return int(res[1]), int(res[0])
    return closest_bucket(width, height, res)


def _old_default_size(data):
    res = data.resolution
    if isinstance(res, int):
        return res, res
    if isinstance(res, tuple):
        return int(res[1]), int(res[0])
    h, w = min(res, key=lambda hw: (abs(math.log(hw[1] / hw[0])), -hw[0] * hw[1]))
    return int(w), int(h)


def _old_sample_size(index, data):
    res = data.resolution
    if isinstance(res, int):
        return res, res
    if isinstance(res, tuple):
        return int(res[1]), int(res[0])
    h, w = res[index % len(res)]
    return int(w), int(h)


def _old_sides(v):
    return [v] if isinstance(v, int) else list(v) if isinstance(v, tuple) else [s for hw in v for s in hw]


def _old_looks_like_path(source):
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or os.path.exists(source)


def _old_resolve_source(model):
    source = model.pretrained
    if source.startswith("builtin:") and source != TINY_ID:
        raise UserError(f"model.pretrained: unknown built-in model '{source}' (use {TINY_ID})")
    if _old_looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(f"model.pretrained: folder '{source}' does not exist (expected a diffusers folder)")
        return str(path)
    if source.count("/") != 1:
        raise UserError(f"model.pretrained '{source}' is neither a folder, a hub id (owner/name) nor {TINY_ID}")
    return source


def _old_preflight_kind(source):
    """What ``check_model_source`` did with a value: "skip" (builtin or hub id), "missing", "file" or "folder"."""
    if source.startswith("builtin:"):
        return "skip"
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
    if not path.exists():
        return "missing" if looks_local else "skip"
    return "folder" if path.is_dir() else "file"


def _old_encoder_identity(pretrained, revision):
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        return f"{pretrained}@{revision or 'main'}"
    h = hashlib.sha256(str(path.resolve()).encode())
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if not (Path(root) == path and x == "transformer"))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- data.resolution

RESOLUTIONS = {
    "int": 64,
    "int-large": 512,
    "hw": [48, 80],
    "buckets": [[48, 80], [64, 64], [80, 48], [32, 112]],
    "one-bucket": [[48, 80]],
    "equally-square": [[32, 32], [64, 64], [48, 48]],
}
IMAGES = [(360, 540), (540, 360), (420, 420), (640, 360), (4000, 10), (10, 4000), (17, 19)]


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as err:  # noqa: BLE001 - the outcome, error or not, is what is compared
        return type(err).__name__, str(err)


@pytest.mark.parametrize("resolution", RESOLUTIONS.values(), ids=RESOLUTIONS.keys())
@pytest.mark.parametrize("resize", [None, "budget", "fixed", "buckets"])
@pytest.mark.parametrize("max_aspect", [4.0, 1.5])
def test_resolution_readers_answer_as_the_old_ladders(resolution, resize, max_aspect):
    data = DataConfig(resolution=resolution, resize=resize, max_aspect=max_aspect)
    assert resize_mode(data) == _old_resize_mode(data)
    assert nominal_area(data) == _old_nominal_area(data)
    assert default_size(data) == _old_default_size(data)
    assert _default_size(QfluxConfig(data=data)) == _old_default_size(data)
    for i in range(7):
        assert sample_size(i, data) == _old_sample_size(i, data)
    for w, h in IMAGES:
        assert _outcome(plan_size, w, h, data) == _outcome(_old_plan_size, w, h, data)


@pytest.mark.parametrize(
    ("resolution", "form", "sizes", "mode", "side", "single"),
    [
        (512, "int", ((512, 512),), "budget", 512, (512, 512)),
        ((512, 768), "hw", ((512, 768),), "fixed", None, (768, 512)),
        ([(512, 768), (768, 512)], "list", ((512, 768), (768, 512)), "buckets", None, None),
        ([(512, 768)], "list", ((512, 768),), "buckets", None, (768, 512)),
    ],
)
def test_resolution_spec_of_each_form(resolution, form, sizes, mode, side, single):
    spec = ResolutionSpec.parse(resolution)
    assert (spec.form, spec.sizes, spec.mode, spec.side, spec.single) == (form, sizes, mode, side, single)
    assert ResolutionSpec.parse(resolution, "fixed").mode == "fixed"  # data.resize wins over the form
    assert spec.nominal_area == max(h * w for h, w in sizes)
    assert spec.buckets(4.0) == (auto_buckets(512, 4.0) if form == "int" else list(sizes))
    assert hash(spec) == hash(ResolutionSpec.parse(resolution))  # frozen, comparable value


def test_the_raw_value_is_kept_for_keys_and_config_yaml():
    """``data.resolution`` stays the value as validated (the cache key and config.yaml use it); the spec is
    derived on demand, so an assignment is seen at once."""
    data = DataConfig(resolution=[[512, 768], [768, 512]], resize="buckets")
    assert data.resolution == [(512, 768), (768, 512)]
    assert data.model_dump(mode="json")["resolution"] == [[512, 768], [768, 512]]
    assert "resolution_spec" not in data.model_dump()
    assert keyed_values(QfluxConfig(data=data))["data.resolution"] == [[512, 768], [768, 512]]
    data.resolution = 256
    data.resize = None
    assert data.resolution_spec == ResolutionSpec("int", ((256, 256),), "budget")


def test_an_empty_bucket_list_fails_where_it_failed():
    data = DataConfig(resolution=[])
    assert resize_mode(data) == _old_resize_mode(data) == "buckets"
    assert _outcome(plan_size, 10, 10, data) == _outcome(_old_plan_size, 10, 10, data)
    assert _outcome(plan_size, 10, 10, data)[0] == "ConfigError"
    for new, old in [(nominal_area, _old_nominal_area), (default_size, _old_default_size)]:
        assert _outcome(new, data)[0] == _outcome(old, data)[0] == "ValueError"


@pytest.mark.parametrize("value", [16, 500, 8, (512, 500), (20, 32), [(512, 512), (384, 600)], [(8, 16)]])
def test_the_validator_rejects_the_same_side_first(value):
    """The validator reports the first side that is not a multiple of 16 (an int's side is read twice now)."""
    old = next((s for s in _old_sides(value) if s < 16 or s % 16), None)
    assert next((s for hw in ResolutionSpec.parse(value).sizes for s in hw if s < 16 or s % 16), None) == old
    if old is None:
        assert DataConfig(resolution=value).resolution == value
    else:
        with pytest.raises(ValidationError, match=f"sides are multiples of 16 \\(at least 16\\): {old} is not"):
            DataConfig(resolution=value)


# --------------------------------------------------------------------------- model.pretrained

SOURCES = [
    "builtin:tiny",
    "builtin:huge",
    "owner/name",
    "not a model id",
    "a/b/c",
    "./here",
    "here-dir",
    "org/repo-dir",
    "a\\b",
    "~/models/x",
    "~/models/missing",
    "/no/such/folder",
    "a-file.txt",
]


@pytest.fixture
def sources_place(tmp_path, monkeypatch) -> Path:
    """cwd with ``here/``, ``here-dir/``, ``org/repo-dir/`` (a hub-looking folder) and a file; HOME with
    ``models/x/``."""
    work, home = tmp_path / "work", tmp_path / "home"
    for d in (work / "here", work / "here-dir", work / "org" / "repo-dir", home / "models" / "x" / "vae"):
        d.mkdir(parents=True)
    (work / "a-file.txt").write_text("x")
    (home / "models" / "x" / "vae" / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    return home


def _raw_model(pretrained: str, revision: str | None = None) -> ModelConfig:
    """A model section that keeps ``pretrained`` as given (no schema ``~`` expansion)."""
    return ModelConfig().model_copy(update={"pretrained": pretrained, "revision": revision})


@pytest.mark.parametrize("pretrained", SOURCES)
def test_model_source_answers_as_the_old_readers(sources_place, pretrained):
    model = _raw_model(pretrained, "v2")
    source = ModelSource.of(model)
    assert _outcome(resolve_source, model) == _outcome(_old_resolve_source, model)
    assert encoder_identity(source) == _old_encoder_identity(pretrained, "v2")
    # the preflight's reading, from the kind: builtin and hub ids are left to the loader
    old = _old_preflight_kind(pretrained)
    if source.kind != "folder":
        assert old == "skip"
    else:
        assert old == ("missing" if not source.path.exists() else "folder" if source.path.is_dir() else "file")


@pytest.mark.parametrize(
    ("pretrained", "kind", "path", "hub_id"),
    [
        ("builtin:tiny", "builtin", None, None),
        ("builtin:huge", "builtin", None, None),
        ("owner/name", "hub", None, "owner/name"),
        ("not a model id", "hub", None, None),
        ("org/repo-dir", "folder", "{work}/org/repo-dir", None),  # exists here: a folder, as before
        ("./here", "folder", "{work}/here", None),
        ("~/models/x", "folder", "{home}/models/x", None),
        ("/no/such/folder", "folder", "/no/such/folder", None),
    ],
)
def test_model_source_kinds(sources_place, pretrained, kind, path, hub_id):
    source = ModelSource.parse(pretrained, "v1")
    expected = path.format(work=Path.cwd(), home=sources_place) if path else None
    resolved = None if source.path is None else str(source.path.absolute())
    assert (source.kind, resolved, source.hub_id, source.revision) == (kind, expected, hub_id, "v1")
    assert source.is_tiny == (pretrained == TINY_ID)
    assert ModelSource.of(_raw_model(pretrained, "v1")) == source


def test_an_empty_source_is_no_longer_the_current_folder(sources_place):
    """The one reading that changed: ``model.pretrained: ""`` was ``Path("")`` = the current folder for the
    cache key, and a malformed hub id for the loader; now it is the malformed hub id everywhere."""
    source = ModelSource.parse("")
    assert (source.kind, source.hub_id) == ("hub", None)
    assert encoder_identity(source) == "@main"
    with pytest.raises(UserError, match="neither a folder"):
        source.resolve()


# --------------------------------------------------------------------------- ~ in model.pretrained and the key


def test_a_tilde_model_folder_keys_by_its_files(sources_place):
    """HOME holding ``models/x``: ``~/models/x`` (kept unexpanded, as around the schema) is keyed by the
    folder's files, as its absolute path is; changing a file there changes the key."""
    tilde = QfluxConfig().model_copy(update={"model": _raw_model("~/models/x")})
    absolute = QfluxConfig().model_copy(update={"model": _raw_model(str(sources_place / "models" / "x"))})
    assert tilde.model.pretrained == "~/models/x"

    def digest(config: QfluxConfig) -> str:
        return CacheContext.from_config(config, "1").digest

    assert keyed_values(tilde)["model.pretrained"] != "~/models/x@main"
    assert digest(tilde) == digest(absolute)
    before = digest(tilde)
    vae = sources_place / "models" / "x" / "vae" / "config.json"
    vae.write_text('{"scaling_factor": 2}')
    os.utime(vae, ns=(1, 1))
    assert digest(tilde) != before
    assert digest(tilde) == digest(absolute)
