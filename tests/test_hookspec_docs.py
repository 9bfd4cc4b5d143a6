"""The plugin and config docs stay true: every hookspec is documented with its real signature and exercised,
every config key is documented with its real type and default, and the doc's example plugins really work."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

import qflux.types
from qflux import hookspecs
from qflux.config import load_config
from qflux.config.schema import ModelConfig, QfluxConfig
from qflux.plugins import build_registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PLUGINS_MD = REPO / "docs" / "plugins.md"
CONFIG_MD = REPO / "docs" / "config.md"

HOOKSPECS = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("qflux_") and callable(fn)}
REGISTRATION_HOOKS = {"qflux_register_trainers", "qflux_register_quantizers"}


def test_hookspecs_are_found() -> None:
    assert len(HOOKSPECS) >= 9
    for fn in HOOKSPECS.values():
        assert isinstance(getattr(fn, "qflux_spec", None), dict), f"{fn.__name__} is not a @hookspec"


# --------------------------------------------------------------------------- plugins.md: hooks


def render_signature(fn) -> str:
    """``def name(arg: Annotation, ...) -> Return`` with the annotations as written in hookspecs.py."""
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {fn.__name__}({params}) -> {sig.return_annotation}"


def normalise(code: str) -> str:
    code = re.sub(r"\s+", " ", code.strip()).rstrip(":")
    return code.replace("( ", "(").replace(" )", ")").replace(", )", ")").replace(",)", ")")


def doc_sections(text: str) -> dict[str, str]:
    """``### `qflux_...``` sections of plugins.md: hook name -> section text."""
    parts = re.split(r"^### `(qflux_\w+)`\s*$", text, flags=re.M)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        out[name] = re.split(r"^#{1,3} ", body, flags=re.M)[0]
    return out


def documented_signature(section: str) -> str | None:
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    return normalise(m.group(1)) if m else None


def test_every_hookspec_is_in_plugins_md_with_its_real_signature() -> None:
    sections = doc_sections(PLUGINS_MD.read_text())
    missing = sorted(set(HOOKSPECS) - set(sections))
    assert not missing, f"hooks missing from docs/plugins.md: {missing}"
    unknown = sorted(set(sections) - set(HOOKSPECS))
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {unknown}"
    for name, fn in HOOKSPECS.items():
        assert documented_signature(sections[name]) == normalise(render_signature(fn)), (
            f"docs/plugins.md: the signature of {name} differs from qflux/hookspecs.py; it is\n"
            f"    {render_signature(fn)}"
        )


def test_plugins_md_documents_when_each_hook_is_called_and_its_dispatch() -> None:
    sections = doc_sections(PLUGINS_MD.read_text())
    for name, fn in HOOKSPECS.items():
        section = sections[name]
        for label in ("**Called:**", "**Dispatch:**", "**Arguments:**", "**Returns:**"):
            assert label in section, f"docs/plugins.md: {name} lacks {label}"
        for param in inspect.signature(fn).parameters:
            assert f"`{param}`" in section, f"docs/plugins.md: {name} does not describe its argument {param!r}"
        dispatch = section.split("**Dispatch:**")[1].split("\n- ")[0]
        assert ("firstresult" in dispatch) == fn.qflux_spec["firstresult"], f"{name}: documented dispatch is wrong"


def test_the_signature_check_catches_a_difference() -> None:
    """The comparison is not vacuous: a renamed argument or a changed return type is a difference."""
    real = normalise(render_signature(hookspecs.qflux_quantize))
    assert normalise(real.replace("method", "name")) != real
    assert normalise(real.replace("-> torch.nn.Module | None", "-> None")) != real
    wrapped = "def qflux_quantize(\n    transformer: torch.nn.Module,\n    method: str,\n    model: ModelConfig,\n) -> torch.nn.Module | None"
    assert normalise(wrapped) == real


def test_every_hookspec_docstring_states_args_return_and_when_called() -> None:
    for name, fn in HOOKSPECS.items():
        doc = inspect.getdoc(fn) or ""
        assert doc, f"{name} has no docstring"
        for param in inspect.signature(fn).parameters:
            assert re.search(rf"^\s*{param}:", doc, flags=re.M), f"{name}: docstring does not describe {param!r}"
        assert "Returns" in doc, f"{name}: docstring does not state what it returns"
        assert "Called" in doc, f"{name}: docstring does not state when it is called"


def test_every_data_type_crossing_hooks_is_in_plugins_md() -> None:
    text = PLUGINS_MD.read_text()
    classes = [c for c in vars(qflux.types).values() if dataclasses.is_dataclass(c) and c.__module__ == "qflux.types"]
    assert classes
    for cls in classes:
        assert f"| `{cls.__name__}` |" in text, f"docs/plugins.md: the data type {cls.__name__} is not listed"


# --------------------------------------------------------------------------- every hook is exercised


def test_every_hookspec_is_implemented_and_exercised(toy_plugin) -> None:
    """Run one pass of every stage through the plugin manager; each hook must be answered by an
    implementation from the tests' toy plugin or the core (the default loss)."""
    import torch
    from PIL import Image

    from qflux.config.schema import LossConfig
    from qflux.training.batching import collate
    from qflux.types import EditSample, ModelBundle, NoisyInput, SampleRequest

    registry = build_registry(extra_plugins=[("toy", toy_plugin)], load_entry_points=False)
    answered: dict[str, set[str]] = {}

    def after(outcome, hook_name, hook_impls, kwargs):  # noqa: ARG001
        if outcome.exception is None and outcome.get_result() is not None:
            answered.setdefault(hook_name, set()).update(registry.pm.get_name(i.plugin) for i in hook_impls)

    registry.pm.add_hookcall_monitoring(lambda *a: None, after)
    hook = registry.hook
    model = ModelConfig(dtype="float32", quantize="toy-round")
    trainer = registry.trainer("toy")
    assert registry.quantizer("toy-round").name == "toy-round"

    transformer = hook.qflux_load_transformer(trainer=trainer, model=model)
    transformer = hook.qflux_quantize(transformer=transformer, method="toy-round", model=model)
    encoders = hook.qflux_load_encoders(trainer=trainer, model=model)
    sample = EditSample(key="a", prompt="make it red", target=Image.new("RGB", (32, 48), "red"),
                        controls=[Image.new("RGB", (32, 48), "blue")], mask=Image.new("L", (32, 48), 255))
    encoded = hook.qflux_encode(trainer=trainer, encoders=encoders, samples=[sample], model=model, empty_prompt=True)
    batch = collate(encoded)
    noise = torch.randn_like(batch.latents)
    sigmas = torch.full((1,), 0.5)
    noisy = NoisyInput(latents=0.5 * batch.latents + 0.5 * noise, sigmas=sigmas, target=noise - batch.latents)
    scheduler_config = hook.qflux_scheduler_config(trainer=trainer, model=model)
    prediction = hook.qflux_predict(trainer=trainer, transformer=transformer, batch=batch, noisy=noisy, model=model)
    loss = hook.qflux_loss(prediction=prediction, noisy=noisy, batch=batch, loss=LossConfig())
    bundle = ModelBundle(trainer=trainer, model=model, transformer=transformer, encoders=encoders)
    image = hook.qflux_sample(bundle=bundle, request=SampleRequest(prompt="x", height=32, width=48))

    assert loss.ndim == 0 and torch.isfinite(loss)
    assert scheduler_config["max_shift"] == 2.25
    assert image.size == (48, 32)
    stage_hooks = set(HOOKSPECS) - REGISTRATION_HOOKS
    assert set(answered) == stage_hooks, f"hooks never exercised: {sorted(stage_hooks - set(answered))}"
    assert answered["qflux_loss"] == {"qflux.default"}
    assert all(answered[h] == {"toy"} for h in stage_hooks - {"qflux_loss"})
    # The registration hooks ran inside build_registry: their effect is what the toy plugin registered.
    record = next(p for p in registry.plugins if p.name == "toy")
    assert record.trainers == ["toy"] and record.quantizers == ["toy-round"]
    assert set(record.hooks) | {"qflux_loss"} == set(HOOKSPECS)


# --------------------------------------------------------------------------- plugins.md: example plugins


def doc_files(text: str) -> dict[str, str]:
    """```python blocks whose first line is ``# file: NAME.py``: NAME.py -> source."""
    out = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            out[first.removeprefix("# file: ").strip()] = block
    return out


def doc_pyproject(text: str) -> dict:
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if "entry-points.qflux" in b]
    assert len(blocks) == 1, "docs/plugins.md should show one pyproject.toml with [project.entry-points.qflux]"
    return tomllib.loads(blocks[0])


def load_doc_module(name: str, tmp_path: Path) -> types.ModuleType:
    import importlib.util

    source = doc_files(PLUGINS_MD.read_text())[name]
    path = tmp_path / name
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minimal_plugin_from_the_doc_works_in_process(tmp_path: Path) -> None:
    import torch

    hello = load_doc_module("qflux_hello.py", tmp_path)
    registry = build_registry(extra_plugins=[("hello", hello)], load_entry_points=False)
    assert not registry.broken
    trainer = registry.trainer("hello")
    layer = registry.hook.qflux_load_transformer(trainer=trainer, model=ModelConfig(dtype="float32"))
    assert isinstance(layer, torch.nn.Linear) and not any(p.requires_grad for p in layer.parameters())
    assert registry.hook.qflux_load_transformer(trainer=dataclasses.replace(trainer, name="other"),
                                                model=ModelConfig()) is None
    config = load_config(None, ["trainer=hello"])
    assert registry.trainer(config.trainer) is trainer


def test_minimal_plugin_from_the_doc_installs_through_its_entry_point(tmp_path: Path, fake_dist, run_qflux) -> None:
    text = PLUGINS_MD.read_text()
    project = doc_pyproject(text)
    entry_points = project["project"]["entry-points"]["qflux"]
    assert entry_points == {"hello": "qflux_hello"}
    root = fake_dist(tmp_path / "site", project["project"]["name"], project["project"]["version"], entry_points,
                     {"qflux_hello.py": doc_files(text)["qflux_hello.py"]})
    result = run_qflux("plugins", "list", "--json", plugins="hello", pythonpath=[root])
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["broken"] == []
    [plugin] = listing["plugins"]
    assert plugin | {"hooks": sorted(plugin["hooks"])} == {
        "name": "hello", "package": "qflux-hello", "version": "0.1.0", "kind": "trainer", "provides": ["hello"],
        "trainers": ["hello"], "quantizers": [], "hooks": ["qflux_load_transformer", "qflux_register_trainers"],
    }
    config = tmp_path / "hello.yaml"
    config.write_text("trainer: hello\n")
    checked = run_qflux("config", "check", config, plugins="hello", pythonpath=[root])
    assert checked.returncode == 0, checked.stderr


def test_loss_wrapper_from_the_doc_wraps_the_default_loss(tmp_path: Path) -> None:
    import torch

    from qflux.config.schema import LossConfig
    from qflux.loss import flow_matching_loss
    from qflux.types import Batch, NoisyInput, PromptEmbeds

    scale = load_doc_module("qflux_loss_scale.py", tmp_path)
    registry = build_registry(extra_plugins=[("scale", scale)], load_entry_points=False)
    assert not registry.broken
    torch.manual_seed(0)
    prediction, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mask = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    batch = Batch(keys=["a", "b"], latents=torch.zeros(2, 6, 4), grid=(2, 3), prompt=PromptEmbeds(torch.zeros(2, 1, 1)),
                  mask=mask)
    noisy = NoisyInput(latents=torch.zeros(2, 6, 4), sigmas=torch.full((2,), 0.5), target=target)
    value = registry.hook.qflux_loss(prediction=prediction, noisy=noisy, batch=batch, loss=LossConfig())
    expected = flow_matching_loss(prediction, target, mask, 2.0, 1.0) * scale.SCALE
    torch.testing.assert_close(value, expected)


# --------------------------------------------------------------------------- config.md


def type_name(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:  # e.g. PathStr: documented as its base type
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"map[{type_name(args[0])}, {type_name(args[1])}]"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    if ann is object:
        return "any"
    return ann.__name__


def bounds(field) -> str:
    import annotated_types as at

    ops = {at.Ge: (">=", "ge"), at.Gt: (">", "gt"), at.Le: ("<=", "le"), at.Lt: ("<", "lt")}
    parts = [f"{ops[type(m)][0]} {getattr(m, ops[type(m)][1])}" for m in field.metadata if type(m) in ops]
    return (", " + ", ".join(parts)) if parts else ""


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def schema_rows(model: type[BaseModel] = QfluxConfig, prefix: str = ""):
    """(dotted key, type, default) of every leaf key, and the names of the sections."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield key, "section", ""
            yield from schema_rows(ann, key)
            continue
        yield key, type_name(ann) + bounds(field), default_text(field)
        item = get_args(ann)[0] if get_origin(ann) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):
            yield from schema_rows(item, key + "[]")


def doc_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([\w.\[\]]+)` \| `(.*?)` \| `(.*?)` \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2).replace("\\|", "|"), m.group(3))
    return rows


def test_every_config_key_is_in_config_md_with_its_type_and_default() -> None:
    text = CONFIG_MD.read_text()
    documented = doc_rows(text)
    expected = list(schema_rows())
    sections = [key for key, kind, _ in expected if kind == "section"]
    keys = {key: (kind, default) for key, kind, default in expected if kind != "section"}
    assert len(keys) > 50
    missing = sorted(set(keys) - set(documented))
    assert not missing, f"config keys missing from docs/config.md: {missing}"
    unknown = sorted(set(documented) - set(keys))
    assert not unknown, f"docs/config.md documents keys the schema lacks: {unknown}"
    for key, (kind, default) in keys.items():
        assert documented[key] == (kind, default), f"docs/config.md: {key} is documented as {documented[key]}, the schema says {(kind, default)}"
    for section in sections:
        assert re.search(rf"^#+ `{re.escape(section)}`$", text, flags=re.M), f"docs/config.md: no heading for {section}"


def test_config_md_example_is_a_valid_config(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", CONFIG_MD.read_text(), flags=re.S)
    assert blocks, "docs/config.md should show an example config"
    path = tmp_path / "example.yaml"
    path.write_text(blocks[0])
    config = load_config(path)
    assert config.model.pretrained == "black-forest-labs/FLUX.1-Kontext-dev"
    assert set(yaml.safe_load(blocks[0])) == set(QfluxConfig.model_fields)  # the example shows every section


def test_readme_links_the_docs() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docs/plugins.md" in readme and "docs/config.md" in readme
