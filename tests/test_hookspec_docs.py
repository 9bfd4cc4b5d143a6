"""The plugin and config docs stay true.

- every hookspec is documented in docs/plugins.md with its real signature, when it is called, its dispatch,
  its arguments and what it returns; every stage and adapter method has its row;
- every hookspec is called during a real toy training run (``qflux train`` in-process, then ``--resume``);
- the documented order of calls of one ``qflux train`` run is the order a recorded run makes them;
- the doc's example plugins work: the ``hello`` trainer of the walkthrough trains in-process and through a
  real entry point, the quantizer, adapter, loss and callback examples do what the doc says;
- every config key is documented in docs/config.md with its real type and default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

import qflux
import qflux.types
from qflux import hookspecs
from qflux.adapters.base import Adapter
from qflux.config import load_config
from qflux.config.schema import ModelConfig, QfluxConfig
from qflux.errors import ConfigError, UserError
from qflux.plugins import build_registry
from qflux.quantizer import Quantizer
from qflux.testing import single_torch_thread, tiny_config, write_config
from qflux.trainer import CAPABILITIES, Trainer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PLUGINS_MD = REPO / "docs" / "plugins.md"
CONFIG_MD = REPO / "docs" / "config.md"

HOOKSPECS = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("qflux_") and callable(fn)}
REGISTRATION_HOOKS = {"qflux_register_trainers", "qflux_register_quantizers", "qflux_register_adapters"}
CALLBACK_HOOKS = {"qflux_on_start", "qflux_on_step", "qflux_on_validation", "qflux_on_checkpoint", "qflux_on_export",
                  "qflux_eval_weights", "qflux_checkpoint_files"}  # the hooks that hand an event


def methods_of(cls: type, helpers: set[str]) -> list[str]:
    """The public methods a plugin's subclass of ``cls`` overrides for the core to call (not the helpers)."""
    return [n for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("_") and n not in helpers]


TRAINER_STAGES = methods_of(Trainer, {"implements", "require", "options"})
QUANTIZER_METHODS = methods_of(Quantizer, set())
ADAPTER_METHODS = methods_of(Adapter, {"options_of"})


def test_hookspecs_and_methods_are_found() -> None:
    assert set(HOOKSPECS) >= REGISTRATION_HOOKS | CALLBACK_HOOKS | {"qflux_loss"}
    assert {"check", *CAPABILITIES, "scheduler_config"} <= set(TRAINER_STAGES)
    assert QUANTIZER_METHODS == ["check", "quantize", "planned_bytes"]
    assert {"check", "attach", "state_dict", "load_state", "export", "load_file"} <= set(ADAPTER_METHODS)
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


def test_every_hookspec_has_a_row_in_the_hook_table() -> None:
    text = PLUGINS_MD.read_text()
    rows = set(re.findall(r"^\| `(qflux_\w+)` \|", text, flags=re.M))
    assert rows == set(HOOKSPECS), f"the hook table of docs/plugins.md differs: {sorted(rows ^ set(HOOKSPECS))}"


def test_the_signature_check_catches_a_difference() -> None:
    """The comparison is not vacuous: a renamed argument or a changed return type is a difference."""
    real = normalise(render_signature(hookspecs.qflux_loss))
    assert normalise(real.replace("noisy:", "noise:")) != real
    assert normalise(real.replace("-> torch.Tensor | None", "-> None")) != real
    wrapped = ("def qflux_loss(\n    prediction: torch.Tensor,\n    noisy: NoisyInput,\n    batch: Batch,\n"
               "    loss: LossConfig,\n) -> torch.Tensor | None")
    assert normalise(wrapped) == real


def test_every_hookspec_docstring_states_args_return_and_when_called() -> None:
    for name, fn in HOOKSPECS.items():
        doc = inspect.getdoc(fn) or ""
        assert doc, f"{name} has no docstring"
        for param in inspect.signature(fn).parameters:
            assert re.search(rf"^\s*{param}:", doc, flags=re.M), f"{name}: docstring does not describe {param!r}"
        assert "Returns" in doc, f"{name}: docstring does not state what it returns"
        assert "Called" in doc, f"{name}: docstring does not state when it is called"


def test_every_data_type_crossing_into_a_trainer_is_in_plugins_md() -> None:
    text = PLUGINS_MD.read_text()
    classes = [c for c in vars(qflux.types).values() if dataclasses.is_dataclass(c) and c.__module__ == "qflux.types"]
    assert classes
    for cls in classes:
        assert f"| `{cls.__name__}` |" in text, f"docs/plugins.md: the data type {cls.__name__} is not listed"


def test_every_field_of_those_types_and_of_the_events_is_documented() -> None:
    """Each row of the data-type table names every field of its type; each callback's section names every
    field of the event it receives."""
    import qflux.events

    text = PLUGINS_MD.read_text()
    for cls in [c for c in vars(qflux.types).values() if dataclasses.is_dataclass(c) and c.__module__ == "qflux.types"]:
        row = re.search(rf"^\| `{cls.__name__}` \|(.*)$", text, flags=re.M).group(1)
        missing = [f.name for f in dataclasses.fields(cls) if not re.search(rf"\b{f.name}\b", row)]
        assert not missing, f"docs/plugins.md: the row of {cls.__name__} does not name {missing}"
    sections = doc_sections(text)
    for name in sorted(CALLBACK_HOOKS):
        event = getattr(qflux.events, inspect.signature(HOOKSPECS[name]).parameters["event"].annotation)
        assert f"`{event.__name__}`" in sections[name], f"docs/plugins.md: {name} does not name {event.__name__}"
        missing = [f.name for f in dataclasses.fields(event) if f"`{f.name}`" not in sections[name]]
        assert not missing, f"docs/plugins.md: {name} does not describe the fields {missing} of {event.__name__}"


def test_every_stage_and_adapter_method_has_its_row() -> None:
    """The trainer's stages (what each receives and returns) and the adapter's methods are tabled."""
    text = PLUGINS_MD.read_text()
    for stage in TRAINER_STAGES:
        params = ", ".join(list(inspect.signature(getattr(Trainer, stage)).parameters)[1:])
        assert f"| `{stage}({params})` |" in text, f"docs/plugins.md: no row for the stage {stage}({params})"
    for method in ADAPTER_METHODS:
        params = ", ".join(list(inspect.signature(getattr(Adapter, method)).parameters)[1:])
        assert f"| `{method}({params})` |" in text, f"docs/plugins.md: no row for Adapter.{method}({params})"
    for method in QUANTIZER_METHODS:
        assert f"`{method}(" in text.split("## Write a quantizer plugin")[1].split("\n## ")[0]


# --------------------------------------------------------------------------- the doc's example files


def doc_files(text: str | None = None) -> dict[str, str]:
    """```python / ```yaml blocks whose first line is ``# file: PATH``: PATH -> source."""
    text = PLUGINS_MD.read_text() if text is None else text
    out = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            out[first.removeprefix("# file: ").strip()] = block
    return out


def doc_pyproject(text: str) -> dict:
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if "entry-points.qflux" in b]
    assert len(blocks) == 1, "docs/plugins.md should show one pyproject.toml with [project.entry-points.qflux]"
    return tomllib.loads(blocks[0])


def hello_files() -> dict[str, str]:
    return {path: src for path, src in doc_files().items() if path.startswith("qflux_hello/")}


def core_imports(source: str) -> list[str]:
    """Imports of the core other than ``qflux`` (``hookimpl``) and ``qflux.plugin_api``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("qflux.") and a.name != "qflux.plugin_api"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("qflux.") and node.module != "qflux.plugin_api":
                bad.append(node.module)
            elif node.module == "qflux":
                bad += [f"qflux.{a.name}" for a in node.names if a.name not in qflux.__all__]
    return bad


def test_the_doc_examples_use_only_the_plugin_api() -> None:
    files = {p: s for p, s in doc_files().items() if p.endswith(".py") and not p.startswith("tests/")}
    assert {"qflux_hello/plugin.py", "qflux_hello/model.py", "qflux_hello/tiny.py", "qflux_round8.py",
            "qflux_bitfit.py", "qflux_loss_scale.py", "qflux_ema.py", "qflux_tracker.py"} <= set(files)
    offenders = {path: bad for path, src in files.items() if (bad := core_imports(src))}
    assert not offenders, f"docs/plugins.md examples import core internals (use qflux.plugin_api): {offenders}"


def test_the_plugin_api_exports_what_the_examples_import() -> None:
    from qflux import plugin_api

    missing = set()
    for path, src in doc_files().items():
        if not path.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module == "qflux.plugin_api":
                missing |= {a.name for a in node.names if a.name not in plugin_api.__all__}
    assert not missing, (f"docs/plugins.md examples import {sorted(missing)} from qflux.plugin_api, which does not "
                         "export them (qflux/plugin_api.py __all__ and docs/plugin-api.md)")


def load_doc_module(name: str, tmp_path: Path) -> types.ModuleType:
    import importlib.util

    path = tmp_path / Path(name).name
    path.write_text(doc_files()[name])
    module_name = f"docs_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pydantic look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    """The walkthrough's package ``qflux_hello`` written from the doc and imported (its ``plugin`` module)."""
    import importlib

    root = tmp_path_factory.mktemp("hello_src")
    for path, src in hello_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(src)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("qflux_hello.plugin")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "qflux_hello" or n.startswith("qflux_hello.")]:
            del sys.modules[name]


# --------------------------------------------------------------------------- a recorded toy run


class RecordedOptions(BaseModel):
    model_config = {"extra": "forbid"}


class RecordingAdapter(Adapter):
    """Trains the biases of the toy's Linear and records every call the core makes on it."""

    name = "recorded"
    Options = RecordedOptions

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def _log(self, method: str) -> None:
        self.recorder.calls.append(f"Adapter.{method}")

    def check(self, options, transformer_module_names):
        self._log("check")

    def attach(self, transformer, options):
        self._log("attach")
        transformer.bias.data = transformer.bias.data.float()
        return [transformer.bias.requires_grad_(True)]

    def state_dict(self, transformer):
        self._log("state_dict")
        return {"bias": transformer.bias.detach().cpu().clone()}

    def load_state(self, transformer, state):
        self._log("load_state")
        transformer.bias.data.copy_(state["bias"])

    def checkpoint_metadata(self, options):
        self._log("checkpoint_metadata")
        return {"recorded": "1"}

    def export(self, transformer, trainer, options, directory, extra_metadata=None):
        from safetensors.torch import save_file

        self._log("export")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.file_name
        save_file({"bias": transformer.bias.detach().cpu().contiguous()}, str(path), metadata=extra_metadata)
        return path

    def load_file(self, transformer, path):
        self._log("load_file")


class Recorder:
    """A plugin implementing every hookspec: records each call (``calls``) and the events (``events``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.events: list[tuple[str, Any]] = []
        self.losses: list[Any] = []  # what the implementations under the wrapper returned
        self.held_out = 0

    @qflux.hookimpl
    def qflux_register_trainers(self, register):
        self.calls.append("qflux_register_trainers")

    @qflux.hookimpl
    def qflux_register_quantizers(self, register):
        self.calls.append("qflux_register_quantizers")

    @qflux.hookimpl
    def qflux_register_adapters(self, register):
        self.calls.append("qflux_register_adapters")
        register(RecordingAdapter(self))

    @qflux.hookimpl(wrapper=True)
    def qflux_loss(self, prediction, noisy, batch, loss):
        import torch

        self.calls.append("qflux_loss")
        value = yield
        self.losses.append(value)
        if not torch.is_grad_enabled():
            # a held-out loss: smaller at every validation, so that validation.select_best exports each time
            self.held_out += 1
            value = value * 0.5 ** self.held_out
        return value

    def _event(self, name: str, event: Any) -> None:
        self.calls.append(name)
        self.events.append((name, event))

    @qflux.hookimpl
    def qflux_on_start(self, event):
        self._event("qflux_on_start", event)

    @qflux.hookimpl
    def qflux_on_step(self, event):
        self._event("qflux_on_step", event)

    @qflux.hookimpl
    def qflux_eval_weights(self, event):
        self._event("qflux_eval_weights", event)  # None: the trained weights are evaluated

    @qflux.hookimpl
    def qflux_checkpoint_files(self, event):
        self._event("qflux_checkpoint_files", event)
        return {"recorder.json": json.dumps({"step": event.step}).encode()}

    @qflux.hookimpl
    def qflux_on_validation(self, event):
        self._event("qflux_on_validation", event)

    @qflux.hookimpl
    def qflux_on_checkpoint(self, event):
        self._event("qflux_on_checkpoint", event)

    @qflux.hookimpl
    def qflux_on_export(self, event):
        self._event("qflux_on_export", event)


def record_methods(mp: pytest.MonkeyPatch, obj: object, prefix: str, names: list[str], recorder: Recorder) -> None:
    """Wrap the methods ``names`` of the instance ``obj`` so each call is appended to ``recorder.calls``
    (``Trainer.implements`` reads the class: the capabilities stay the toy's)."""
    for name in names:
        original = getattr(obj, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            recorder.calls.append(f"{prefix}.{_name}")
            return _original(*args, **kwargs)

        mp.setattr(obj, name, recorded)


@dataclasses.dataclass
class RecordedRun:
    calls: list[str]
    events: list[tuple[str, Any]]
    losses: list[Any]
    registry: Any
    output: Path


def run_qflux_train(config: Path, **options: Any) -> None:
    """``qflux train CONFIG [--resume] [--cache]`` in this process (``qflux.cli.train_cmd.train``)."""
    from qflux.cli.train_cmd import train

    args = dict(file=config, config=None, trainer=None, set_=[], resume=False, resume_from=None, cache=False,
                allow_no_controls=False)
    with single_torch_thread():
        train(**{**args, **options})


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory, toy_plugin) -> list[RecordedRun]:
    """Two ``qflux train`` runs of the toy trainer with every optional phase on (quantizer, resolution_shift,
    held-out samples, validation images, select_best, checkpoints): a fresh run of 4 steps, then ``--resume``
    to 6 steps with ``--cache`` into an empty cache folder."""
    import qflux.plugins

    tmp = tmp_path_factory.mktemp("recorded")
    real_build = qflux.plugins.build_registry
    recorder = Recorder()
    built = []

    def build_registry_with_recorder(*args, **kwargs):
        registry = real_build(extra_plugins=[("toy", toy_plugin), ("recorder", recorder)], load_entry_points=False)
        built.append(registry)
        return registry

    config = tiny_config(
        tmp, trainer="toy",
        model={"dtype": "float32", "quantize": "toy-round", "adapter": "recorded"},
        train={"max_steps": 4, "batch_size": 2, "save_every": 2, "timestep_sampling": "resolution_shift"},
        validation={"every": 2, "from_holdout": 1, "steps": 2, "select_best": "val_loss"},
    )
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qflux.plugins, "build_registry", build_registry_with_recorder)
        record_methods(mp, toy_plugin.TOY, "Trainer", TRAINER_STAGES, recorder)
        record_methods(mp, toy_plugin.ROUND, "Quantizer", QUANTIZER_METHODS, recorder)
        for name, changes, options in [
            ("fresh", {}, {}),
            ("resumed", {"train": {**config["train"], "max_steps": 6}, "cache": {"enabled": True, "dir": str(tmp / "cache2")}},
             {"resume": True, "cache": True}),
        ]:
            recorder.calls, recorder.events, recorder.losses = [], [], []
            run_qflux_train(write_config(tmp / f"{name}.yaml", {**config, **changes}), **options)
            runs.append(RecordedRun(recorder.calls, recorder.events, recorder.losses, built[-1], tmp / "run"))
    return runs


def test_every_hookspec_is_called_in_a_real_training_run(recorded_runs) -> None:
    """``qflux train`` then ``--resume`` of the toy trainer: every hookspec is called, the callbacks with the
    documented events, the loss by the core's default under the recorder's wrapper."""
    import torch

    called = {c for run in recorded_runs for c in run.calls if c.startswith("qflux_")}
    assert called == set(HOOKSPECS), f"hookspecs never called in a real run: {sorted(set(HOOKSPECS) - called)}"
    fresh, resumed = recorded_runs
    registry = fresh.registry
    assert set(registry.trainers) == {"toy"} and set(registry.quantizers) == {"toy-round"}
    assert set(registry.adapters) == {"lora", "lokr", "loha", "recorded"}  # the core's own and the recorder's
    assert all(v.ndim == 0 and torch.isfinite(v) for run in recorded_runs for v in run.losses)

    def of(run, name):
        return [e for n, e in run.events if n == name]

    assert [e.step for e in of(fresh, "qflux_on_step")] == [1, 2, 3, 4]
    assert [e.step for e in of(resumed, "qflux_on_step")] == [5, 6]
    step = of(fresh, "qflux_on_step")[0]
    assert step.adapter is registry.adapters["recorded"] and step.is_main and step.config.trainer == "toy"
    assert step.params == [step.transformer.bias] and step.lr > 0 and step.loss > 0
    assert [(e.step, e.val_loss is not None) for e in of(fresh, "qflux_on_validation")] == [
        (0, True), (2, True), (4, True)]
    assert [e.step for e in of(resumed, "qflux_on_validation")] == [4, 6]  # its start (held-out loss) and end
    checkpoints = of(fresh, "qflux_on_checkpoint") + of(resumed, "qflux_on_checkpoint")
    assert [e.step for e in checkpoints] == [2, 4, 6]
    assert all(e.path.name == f"step-{e.step:06d}" and e.path.is_dir() for e in checkpoints)
    assert [(e.step, e.checkpoint) for e in of(fresh, "qflux_on_start")] == [(0, None)]
    [start] = of(resumed, "qflux_on_start")
    assert start.step == 4 and start.checkpoint == fresh.output / "checkpoints" / "step-000004"
    assert json.loads((start.checkpoint / "recorder.json").read_text()) == {"step": 4}  # the plugin's file
    assert start.params == [start.transformer.bias] and start.adapter is resumed.registry.adapters["recorded"]
    assert [e.step for e in of(fresh, "qflux_checkpoint_files")] == [2, 4]
    purposes = [(e.step, e.purpose) for e in of(fresh, "qflux_eval_weights")]
    assert purposes[:2] == [(0, "validation"), (0, "validation")] and purposes[-1] == (4, "export")
    [export] = of(resumed, "qflux_on_export")
    assert export.step == 6 and export.path == fresh.output / Adapter.file_name and export.path.is_file()


# --------------------------------------------------------------------------- the documented call order

ORDER_HEADING = "## The order of calls in one `qflux train` run"
CALL = r"(?:Trainer|Quantizer|Adapter)\.\w+|qflux_\w+"
KNOWN_CALLS = ({f"Trainer.{m}" for m in TRAINER_STAGES} | {f"Quantizer.{m}" for m in QUANTIZER_METHODS}
               | {f"Adapter.{m}" for m in ADAPTER_METHODS} | set(HOOKSPECS))


def order_block(text: str) -> str:
    assert ORDER_HEADING in text, f"docs/plugins.md has no section '{ORDER_HEADING}'"
    m = re.search(r"```text\n(.*?)```", text.split(ORDER_HEADING, 1)[1], flags=re.S)
    assert m, "the call-order section of docs/plugins.md has no ```text block"
    return m.group(1)


@dataclasses.dataclass
class Order:
    pattern: re.Pattern
    lazy: dict[str, set[str]]  # a call made lazily -> the calls it comes right before
    lines: list[str]  # the lines that name calls


def order_lines(block: str) -> list[tuple[str, str]]:
    """(calls column, note) of each line: the columns are separated by two or more spaces."""
    out = []
    for line in block.splitlines():
        if line.strip():
            m = re.match(r"^\s*(\S.*?)(?:\s{2,}(.*))?$", line)
            out.append((m.group(1), m.group(2) or ""))
    return out


def parse_order(block: str) -> Order:
    """The call-order block as a regular expression over a trace ``NAME;NAME;...``: a name is one call, ``?``
    ``*`` ``+`` apply to the name or the ``( ... )`` group before them, ``->`` and spaces are sequence. A line
    whose note starts with "lazily" is no position: its call must come right before one the note names."""
    parts: list[str] = []
    lazy: dict[str, set[str]] = {}
    lines = []
    for calls, note in order_lines(block):
        tokens = re.findall(r"\(|\)[?*+]?|->|[\w.]+[?*+]?|\S", calls)
        for token in tokens:
            name = token.rstrip("?*+")
            if re.fullmatch(r"[\w.]+", name):
                assert name in KNOWN_CALLS, f"the call order names {name!r}, which is no hook or method of the core"
            else:
                assert token in ("(", "->") or re.fullmatch(r"\)[?*+]?", token), f"bad token {token!r} in {calls!r}"
        names = [t.rstrip("?*+") for t in tokens if re.fullmatch(r"[\w.]+[?*+]?", t)]
        if names:
            lines.append(calls)
        if note.startswith("lazily"):
            assert len(names) == 1, f"a lazy line names one call: {calls!r}"
            lazy[names[0]] = set(re.findall(CALL, note))
            assert lazy[names[0]], f"a lazy line names the calls it comes before: {note!r}"
            continue
        for token in tokens:
            if token == "(":
                parts.append("(?:")
            elif token.startswith(")"):
                parts.append(token)
            elif token != "->":
                name, suffix = token.rstrip("?*+"), token[len(token.rstrip("?*+")):]
                parts.append(f"(?:{re.escape(name)};){suffix}")
    return Order(re.compile("".join(parts)), lazy, lines)


def collapsed(trace: list[str]) -> str:
    """The trace with repeats of one call or of one pair of calls written once with a count (for messages)."""
    out: list[str] = []
    i = 0
    while i < len(trace):
        width, n = 1, 1
        for w in (1, 2):
            unit, k = trace[i:i + w], 1
            while trace[i + k * w:i + (k + 1) * w] == unit:
                k += 1
            if k > 1:
                width, n = w, k
                break
        out.append(" -> ".join(trace[i:i + width]) + (f" x{n}" if n > 1 else ""))
        i += width * n
    return "\n    ".join(out)


def order_mismatch(order: Order, trace: list[str]) -> str | None:
    """Why ``trace`` does not follow ``order`` (None: it does)."""
    for i, call in enumerate(trace):
        if call in order.lazy and (i + 1 == len(trace) or trace[i + 1] not in order.lazy[call]):
            following = trace[i + 1] if i + 1 < len(trace) else "nothing"
            return f"{call} is followed by {following}, not by {' or '.join(sorted(order.lazy[call]))}"
    rest = [c for c in trace if c not in order.lazy]
    if order.pattern.fullmatch("".join(f"{c};" for c in rest)) is None:
        return "the calls of the run do not follow the documented order"
    return None


def test_the_documented_call_order_is_the_order_of_a_real_run(recorded_runs) -> None:
    order = parse_order(order_block(PLUGINS_MD.read_text()))
    for run, name in zip(recorded_runs, ["qflux train", "qflux train --resume --cache"], strict=True):
        problem = order_mismatch(order, run.calls)
        assert problem is None, (f"docs/plugins.md, '{ORDER_HEADING}': {problem} ({name}); the run made, in this "
                                 f"order:\n    {collapsed(run.calls)}")


def test_every_line_of_the_call_order_is_taken_by_the_recorded_runs(recorded_runs) -> None:
    """Each line is load-bearing: without it a recorded run no longer follows the block (so each line is where
    the runs make its calls, and the runs exercise every documented call, optional ones included)."""
    block = order_block(PLUGINS_MD.read_text())
    lines = block.splitlines()
    unneeded = []
    for i, line in enumerate(lines):
        calls = order_lines(line)
        if not calls or not re.search(CALL, calls[0][0]):
            continue
        order = parse_order("\n".join(lines[:i] + lines[i + 1:]))
        if all(order_mismatch(order, run.calls) is None for run in recorded_runs):
            unneeded.append(line.strip())
    assert not unneeded, f"call-order lines no recorded run needs (wrong place, or never taken): {unneeded}"


def swap_lines(block: str, first: str, second: str) -> str:
    """The block with the lines whose calls column is ``first`` and ``second`` swapped (their indentation kept)."""
    lines = block.splitlines()
    index = {calls: i for i, line in enumerate(lines) for calls, _ in order_lines(line)}
    a, b = index[first], index[second]
    indent = [re.match(r"\s*", lines[a]).group(), re.match(r"\s*", lines[b]).group()]
    lines[a], lines[b] = indent[0] + lines[b].strip(), indent[1] + lines[a].strip()
    return "\n".join(lines)


@pytest.mark.parametrize(("first", "second"), [
    ("Adapter.check", "Trainer.check"),
    ("Trainer.check", "Quantizer.check?"),
    ("Trainer.scheduler_config?", "Trainer.load_transformer"),
    ("Trainer.load_transformer", "Quantizer.quantize?"),
    ("Quantizer.quantize?", "Adapter.attach"),
    ("Adapter.attach", "Adapter.load_state?"),
    ("(Trainer.predict -> qflux_loss)+", "qflux_on_step"),
    ("Adapter.state_dict -> qflux_eval_weights -> Adapter.export", "qflux_on_validation"),
    ("qflux_on_validation", "qflux_on_export"),
])
def test_the_call_order_check_catches_two_swapped_stages(recorded_runs, first, second) -> None:
    block = order_block(PLUGINS_MD.read_text())
    order = parse_order(block)
    assert all(order_mismatch(order, run.calls) is None for run in recorded_runs)
    swapped = parse_order(swap_lines(block, first, second))
    assert any(order_mismatch(swapped, run.calls) is not None for run in recorded_runs), (
        f"a call order with {first} and {second} swapped still matches the recorded runs")


def test_the_call_order_check_catches_an_encode_after_the_transformer(recorded_runs) -> None:
    """The first stage order users rely on: the dataset is encoded (encoders freed) before the transformer loads."""
    block = order_block(PLUGINS_MD.read_text())
    lines = block.splitlines()
    encode = max(i for i, line in enumerate(lines) if line.lstrip().startswith("Trainer.encode*"))
    load = next(i for i, line in enumerate(lines) if line.lstrip().startswith("Trainer.load_transformer"))
    assert encode < load
    moved = lines[:encode] + lines[encode + 1:load + 1] + [lines[encode]] + lines[load + 1:]
    assert order_mismatch(parse_order("\n".join(moved)), recorded_runs[0].calls) is not None
    lazy = parse_order(block.replace("lazily: right before the first Trainer.encode or Trainer.sample",
                                     "lazily: right before the first Trainer.sample"))
    assert order_mismatch(lazy, recorded_runs[0].calls) is not None  # a wrong lazy note is caught too


def test_the_order_parser_refuses_unknown_names() -> None:
    with pytest.raises(AssertionError, match="Trainer.prdict"):
        parse_order("Trainer.check\nTrainer.prdict    a typo")


# --------------------------------------------------------------------------- the walkthrough: qflux-hello


def test_the_pyproject_declares_the_walkthrough_plugin() -> None:
    project = doc_pyproject(PLUGINS_MD.read_text())["project"]
    assert project["entry-points"]["qflux"] == {"hello": "qflux_hello.plugin"}
    assert {"qflux_hello/__init__.py", "qflux_hello/plugin.py", "qflux_hello/model.py",
            "qflux_hello/tiny.py"} == set(hello_files())


def test_the_skeleton_trainer_is_refused_as_documented(hello) -> None:
    """Step 2 of the walkthrough: a trainer with no stage is refused by qflux train in the documented line."""
    from qflux.run.preflight import check_capabilities

    skeleton = Trainer(hello.HelloTrainer.info)
    with pytest.raises(UserError) as err:
        check_capabilities(load_config(None, ["trainer=hello"]), skeleton)
    shown = re.search(r"\$ qflux train hello.yaml\n(.*?)\n```", PLUGINS_MD.read_text()).group(1)
    assert str(err.value) == shown and err.value.exit_code == 2


def test_the_hello_stages_return_what_the_doc_says(hello) -> None:
    import torch
    from PIL import Image

    from qflux.training.batching import collate
    from qflux.types import EditSample, ModelBundle, NoisyInput, SampleRequest

    registry = build_registry(extra_plugins=[("hello", hello)], load_entry_points=False)
    assert not registry.broken and registry.plugins[0].hooks == ["qflux_register_trainers"]
    trainer = registry.trainer("hello")
    assert all(trainer.implements(s) for s in CAPABILITIES) and not trainer.implements("scheduler_config")
    model = ModelConfig(dtype="float32", options={"shift": 3.0})
    transformer = trainer.load_transformer(model)
    assert not any(p.requires_grad for p in transformer.parameters()) and not transformer.training
    encoders = trainer.load_encoders(model)
    sample = EditSample(key="a", prompt="make it red", target=Image.new("RGB", (48, 32), "red"),
                        controls=[Image.new("RGB", (48, 32), "blue")], mask=Image.new("L", (48, 32), 255))
    [encoded] = trainer.encode(encoders, [sample], model, True)
    assert encoded.grid == (2, 3) and encoded.latents.shape == (6, 3) and encoded.control_grids == [(2, 3)]
    assert encoded.prompt.hidden.shape == (12, 4) and encoded.prompt.mask.shape == (12,)
    assert encoded.mask.tolist() == [1.0] * 6 and encoded.empty_prompt.hidden.shape == (1, 4)
    batch = collate([encoded])
    noise = torch.randn_like(batch.latents)
    noisy = NoisyInput(latents=0.5 * batch.latents + 0.5 * noise, sigmas=torch.full((1,), 0.5),
                       target=noise - batch.latents)
    assert trainer.predict(transformer, batch, noisy, model).shape == (1, 6, 3)
    transformer.train()
    bundle = ModelBundle(trainer=trainer, model=model, transformer=transformer, encoders=encoders)
    image = trainer.sample(bundle, SampleRequest(prompt="x", controls=[sample.controls[0]], height=32, width=48,
                                                  steps=3))
    assert image.size == (48, 32) and transformer.training  # sampling leaves the train mode alone
    with pytest.raises(UserError, match="multiples of 16"):
        trainer.sample(bundle, SampleRequest(prompt="x", height=40, width=48, steps=1))


def test_the_hello_checks_are_the_documented_ones(hello) -> None:
    """Preflight on the walkthrough's trainer: the meta-device tiny model for model.lora.targets (the
    convention), model.options with did-you-mean, and Trainer.check."""
    from qflux.run.lora_targets import meta_transformer
    from qflux.run.preflight import check_config

    text = PLUGINS_MD.read_text()
    registry = build_registry(extra_plugins=[("hello", hello)], load_entry_points=False)
    config = load_config(None, ["trainer=hello"])
    check_config(config, registry)
    meta = meta_transformer(config, registry.trainer("hello"))
    assert type(meta).__name__ == "HelloTransformer" and meta.attn.to_q.weight.is_meta
    documented = re.search(r"`(model\.lora\.targets: no module named 'to_qq'[^`]*?) \.\.\.`", text).group(1)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, ["trainer=hello", "model.lora.targets=[to_qq]"]), registry)
    assert str(err.value).startswith(documented)
    documented = re.search(r"`(unknown key 'model\.options\.shfit'[^`]*)`", text).group(1)
    with pytest.raises(ConfigError, match=re.escape(documented)):
        check_config(load_config(None, ["trainer=hello", "model.options={shfit: 2}"]), registry)
    with pytest.raises(UserError, match="model.gradient_checkpointing"):
        check_config(load_config(None, ["trainer=hello", "model.gradient_checkpointing=true"]), registry)


class Snapshots:
    """Keeps each step's adapter parameters (and the objects) to check the EMA example against."""

    def __init__(self) -> None:
        self.params: list[list[Any]] = []
        self.last: Any = None

    @qflux.hookimpl
    def qflux_on_step(self, event):
        self.params.append([p.detach().float().clone() for p in event.params])
        self.last = event


def test_hello_trains_with_the_doc_callbacks(hello, tmp_path: Path) -> None:
    """A real run of the walkthrough's trainer with the EMA and tracker examples: the EMA file holds the
    average of the recorded steps' weights in the adapter's names, the live weights come back, the tracker
    logs every step and held-out loss."""
    import torch
    from safetensors.torch import load_file

    from qflux.run.train import train

    ema, tracker, snapshots = load_doc_module("qflux_ema.py", tmp_path), load_doc_module("qflux_tracker.py", tmp_path), Snapshots()
    registry = build_registry(extra_plugins=[("hello", hello), ("ema", ema), ("tracker", tracker), ("snap", snapshots)],
                              load_entry_points=False)
    assert not registry.broken
    config = load_config(write_config(tmp_path / "hello.yaml", tiny_config(
        tmp_path, trainer="hello", model={"options": {"shift": 3.0}}, train={"max_steps": 4, "save_every": 0},
        validation={"every": 2, "from_holdout": 1, "steps": 3})))
    with single_torch_thread():
        result = train(config, registry=registry)
    assert result.lora_path == tmp_path / "run" / "pytorch_lora_weights.safetensors" and result.lora_path.is_file()
    assert all(torch.isfinite(torch.tensor(result.losses))) and len(snapshots.params) == 4
    final = {k: v.clone() for k, v in result.lora.items()}  # on CPU they may be the parameters themselves

    expected = [p.clone() for p in snapshots.params[0]]
    for step in snapshots.params[1:]:
        for shadow, p in zip(expected, step):
            shadow.lerp_(p, 1 - ema.DECAY)
    event = snapshots.last
    live = event.adapter.state_dict(event.transformer)
    assert live.keys() == final.keys() and all(torch.equal(live[k], final[k]) for k in live)  # restored
    with torch.no_grad():
        for p, value in zip(event.params, expected):
            p.copy_(value)
    averaged = event.adapter.state_dict(event.transformer)
    written = load_file(str(result.lora_path.with_name("ema_" + result.lora_path.name)))
    assert written.keys() == averaged.keys()
    assert all(torch.allclose(written[k], averaged[k]) for k in written)
    assert any(not torch.equal(written[k], final[k]) for k in written)

    rows = [json.loads(line) for line in (tmp_path / "run" / "tracker.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]  # step 0: the held-out loss before training


def test_the_doc_test_of_a_plugin_passes(hello, tmp_path: Path) -> None:
    """The "Testing a plugin" example is a real test: run it."""
    tests = load_doc_module("tests/test_hello.py", tmp_path)
    (tmp_path / "run").mkdir()
    with single_torch_thread():
        tests.test_hello_trains(tmp_path / "run")


def test_hello_installs_through_its_entry_point_and_trains(tmp_path: Path, fake_dist, run_qflux) -> None:
    """The walkthrough end to end: install (a fake distribution from the doc's pyproject and files), list,
    check, ``qflux train hello.yaml`` (the doc's console lines appear), ``qflux sample`` with the LoRA."""
    from PIL import Image

    text = PLUGINS_MD.read_text()
    project = doc_pyproject(text)["project"]
    root = fake_dist(tmp_path / "site", project["name"], project["version"], project["entry-points"]["qflux"],
                     hello_files())
    result = run_qflux("plugins", "list", "--json", plugins="hello", pythonpath=[root])
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["broken"] == []
    assert listing["plugins"] == [{
        "name": "hello", "package": "qflux-hello", "version": "0.1.0", "kind": "trainer", "provides": ["hello"],
        "trainers": ["hello"], "quantizers": [], "adapters": [], "hooks": ["qflux_register_trainers"],
    }]
    (tmp_path / "hello.yaml").write_text(doc_files()["hello.yaml"])
    checked = run_qflux("config", "check", "hello.yaml", plugins="hello", pythonpath=[root])
    assert checked.returncode == 0, checked.stderr
    trained = run_qflux("train", "hello.yaml", plugins="hello", pythonpath=[root])
    assert trained.returncode == 0, trained.stderr[-3000:]
    console = re.search(r"\$ pip install -e \.\n\$ qflux train hello\.yaml\n(.*?)\n\$ qflux sample", text,
                        flags=re.S).group(1)
    for line in console.splitlines():
        if line != "...":
            assert line in trained.stderr, f"docs/plugins.md shows {line!r}; qflux train printed:\n{trained.stderr}"
    lora = tmp_path / "runs" / "hello" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    sampled = run_qflux("sample", "hello.yaml", "--lora", lora, "--prompt", "make the red circle blue", "--image",
                        "in.png", "--out", "out.png", "--steps", "4", plugins="hello", pythonpath=[root])
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert Image.open(tmp_path / "out.png").size == (32, 32)


# --------------------------------------------------------------------------- the other examples


def test_quantizer_example_quantizes_and_checks(tmp_path: Path) -> None:
    import torch

    round8 = load_doc_module("qflux_round8.py", tmp_path)
    registry = build_registry(extra_plugins=[("round8", round8)], load_entry_points=False)
    assert not registry.broken and registry.plugins[0].kind == "quantizer"
    quantizer = registry.quantizer("round8")
    assert isinstance(quantizer, Quantizer)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    skipped = model[1].weight.detach().clone()
    out = quantizer.quantize(model, ModelConfig(dtype="float32", quantize="round8", quantize_skip=["1"]))
    assert out is model and torch.equal(model[1].weight, skipped)
    for row in model[0].weight:
        levels = row / (row.abs().max() / 127)
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    quantizer.check(ModelConfig(dtype="bfloat16", quantize="round8"))
    with pytest.raises(UserError, match="model.dtype"):
        quantizer.check(ModelConfig(dtype="float16", quantize="round8"))


def test_adapter_example_trains_checkpoints_exports_and_loads(tmp_path: Path, toy_plugin) -> None:
    """The BitFit example as ``model.adapter`` of a real toy run: options validated in preflight, the biases
    trained, checkpointed with its metadata, exported under its file name, loaded back by ``load_file``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from qflux.run.preflight import check_config
    from qflux.run.train import train

    bitfit = load_doc_module("qflux_bitfit.py", tmp_path)
    registry = build_registry(extra_plugins=[("toy", toy_plugin), ("bitfit", bitfit)], load_entry_points=False)
    assert not registry.broken and isinstance(registry.adapter("bitfit"), Adapter)
    with pytest.raises(ConfigError, match=r"model.adapter_options.target' \(did you mean 'model.adapter_options.targets'"):
        check_config(load_config(None, ["trainer=toy", "model.adapter=bitfit", "model.adapter_options={target: [x]}"]),
                     registry)
    config = load_config(write_config(tmp_path / "bitfit.yaml", tiny_config(
        tmp_path, trainer="toy", model={"dtype": "float32", "adapter": "bitfit"},
        train={"max_steps": 2, "save_every": 1}, data={"holdout": 0})))
    check_config(config, registry)
    with single_torch_thread():
        result = train(config, registry=registry)
    assert result.lora_path == tmp_path / "run" / "bitfit.safetensors"
    exported = load_file(str(result.lora_path))
    assert exported.keys() == result.lora.keys() == {"bias"} and torch.equal(exported["bias"], result.lora["bias"])
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-000001" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["qflux_adapter"] == "bitfit"
    fresh = toy_plugin.TOY.load_transformer(config.model)
    assert not torch.equal(fresh.bias, exported["bias"])
    registry.adapter("bitfit").load_file(fresh, result.lora_path)
    assert torch.equal(fresh.bias, exported["bias"])
    adapter = registry.adapter("bitfit")
    adapter.check(adapter.options_of(config.model), None)
    adapter.check(bitfit.BitFitOptions(targets=["attn.to_q"]), ["", "attn", "attn.to_q"])
    with pytest.raises(UserError, match="no layer named to_x"):
        adapter.check(bitfit.BitFitOptions(targets=["to_q", "to_x"]), ["", "attn", "attn.to_q"])
    save_file({"bias": torch.zeros(5)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="other.safetensors: bias"):
        registry.adapter("bitfit").load_file(fresh, tmp_path / "other.safetensors")


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
    if ann is object or ann is Any:
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
    assert {"model.adapter", "model.adapter_options", "model.options"} <= set(keys)
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
