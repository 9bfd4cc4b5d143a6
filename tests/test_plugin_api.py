"""The declared plugin API (``qflux.plugin_api``, docs/plugin-api.md, issue 15 item 7).

- every module of the plugin packages under ``packages/qflux-*/src/`` (not the core) imports from the core only
  ``qflux`` and ``qflux.plugin_api``, and only names the API exports; type-only imports (``if TYPE_CHECKING:``)
  and imports inside functions count too: a core rename must not break a plugin, not even its type checking;
- importing ``qflux.plugin_api`` stays light (``qflux plugins list`` imports every plugin module);
- every exported name is a documented object and has its place in docs/plugin-api.md;
- the shared model helpers behave as the plugins rely on.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import qflux
from qflux import plugin_api
from qflux.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted(p for p in (REPO / "packages").glob("qflux-*/src") if p.parent.name != "qflux-core")
API_DOC = REPO / "docs" / "plugin-api.md"
ALLOWED_FROM_QFLUX = {*qflux.__all__, "plugin_api"}


# --------------------------------------------------------------------------- (a) what plugins import


def core_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` of every import of the core in ``tree`` that is not part of the plugin API."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qflux.") and alias.name != "qflux.plugin_api":
                    bad.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qflux":
                names = [a.name for a in node.names if a.name not in ALLOWED_FROM_QFLUX]
            elif node.module == "qflux.plugin_api":
                names = [a.name for a in node.names if a.name not in plugin_api.__all__]
            elif node.module.startswith("qflux."):
                names = [a.name for a in node.names]
            else:
                continue
            if names:
                bad.append((node.lineno, f"from {node.module} import {', '.join(names)}"))
    return bad


def test_the_scan_finds_core_imports():
    code = (
        "import qflux\nimport qflux.plugin_api\nfrom qflux import hookimpl\nfrom qflux.plugin_api import Trainer\n"
        "import qflux_kontext.loading\nfrom qflux_qwen import variants\n"
        "import qflux.types\nfrom qflux.loss import mask_to_tokens\nfrom qflux import types\n"
        "from qflux.plugin_api import _LAZY\nif TYPE_CHECKING:\n    from qflux.config.schema import ModelConfig\n"
        "def f():\n    from qflux.errors import UserError\n"
    )
    assert [line for line, _ in core_imports(ast.parse(code))] == [7, 8, 9, 10, 12, 14]


def test_plugin_sources_are_found():
    names = {p.parent.name for p in PLUGIN_SOURCES}
    assert {"qflux-kontext", "qflux-qwen", "qflux-quant"} <= names
    assert all(list(p.rglob("*.py")) for p in PLUGIN_SOURCES)


def test_plugins_import_only_the_plugin_api():
    """Every file, the plugin.py entry points included."""
    offenders = []
    for src in PLUGIN_SOURCES:
        for file in sorted(src.rglob("*.py")):
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
            offenders += [f"{file.relative_to(REPO)}:{line}: {what}" for line, what in core_imports(tree)]
    assert not offenders, (
        "plugins import from the core only `qflux` and `qflux.plugin_api` (docs/plugin-api.md); these import "
        "core internals instead:\n" + "\n".join(offenders)
    )


# --------------------------------------------------------------------------- (b) light import


def test_importing_the_plugin_api_imports_no_heavy_library():
    code = (
        "import json, sys\nimport qflux.plugin_api\n"
        "print(json.dumps([m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'huggingface_hub') "
        "if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


# --------------------------------------------------------------------------- (c) documented


def test_every_exported_name_is_documented():
    text = API_DOC.read_text(encoding="utf-8")
    assert len(plugin_api.__all__) == len(set(plugin_api.__all__))
    undocumented, missing_in_doc = [], []
    for name in plugin_api.__all__:
        obj = getattr(plugin_api, name)
        value = isinstance(obj, (str, int, float, tuple, types.GenericAlias))  # a constant or a type alias
        if not value and not (inspect.getdoc(obj) or "").strip():
            undocumented.append(name)
        if f"`{name}`" not in text and f"`{name}(" not in text:
            missing_in_doc.append(name)
    assert not undocumented, f"exported without a docstring: {undocumented}"
    assert not missing_in_doc, f"exported but not in {API_DOC.relative_to(REPO)}: {missing_in_doc}"


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'resolve'"):
        plugin_api.resolve  # noqa: B018
    assert {"mask_to_tokens", "ModelConfig"} <= set(dir(plugin_api))


# --------------------------------------------------------------------------- the model helpers


def test_unwrap_peels_wrappers_but_not_a_transformers_backbone():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    class DDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    class Backbone(torch.nn.Module):  # a transformers model exposes its backbone as base_model: not a wrapper
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        @property
        def base_model(self):
            return self.inner

    assert plugin_api.unwrap(model) is model
    assert plugin_api.unwrap(Compiled(DDP(model))) is model
    backbone = Backbone()
    assert plugin_api.unwrap(backbone) is backbone


def test_unwrap_peels_a_peft_model():
    import torch

    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"]))
    assert plugin_api.unwrap(wrapped) is model


def test_device_dtype_and_frozen():
    import torch

    layer = torch.nn.Linear(2, 2)
    assert plugin_api.device_of(layer) == torch.device("cpu")
    assert plugin_api.device_of(torch.nn.ReLU()) == torch.device("cpu")
    assert plugin_api.compute_dtype(layer) == torch.float32
    assert plugin_api.compute_dtype(torch.nn.ReLU()) == torch.float32
    assert plugin_api.frozen(layer) is layer and not layer.training
    assert not any(p.requires_grad for p in layer.parameters()) and layer.weight.dtype == torch.float32
    plugin_api.frozen(layer, torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and plugin_api.compute_dtype(layer) == torch.bfloat16

    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.Linear(2, 2))
    plugin_api.frozen(mixed, torch.bfloat16)  # its dtype (the first layer's) is right: layers kept apart stay
    assert mixed[1].weight.dtype == torch.float32


def test_eval_mode_restores_every_submodule():
    import torch

    a, b = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    a.train()
    a[1].eval()  # a mixed module: every submodule gets its own mode back
    b.eval()
    with plugin_api.eval_mode(a, b):
        assert not any(m.training for m in [*a.modules(), b])
    assert a.training and a[0].training and not a[1].training and not b.training
    with pytest.raises(RuntimeError), plugin_api.eval_mode(a):
        raise RuntimeError("boom")
    assert a.training


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError("no file named config.json"), "cannot load vae: no file named config.json"),
        (ValueError("size mismatch"), "cannot load vae: size mismatch"),
        (RuntimeError("a GPU is needed"), "pre-quantized weights that need a GPU"),
        (RuntimeError("bug"), None),
        (KeyError("bug"), None),
    ],
)
def test_guarded_load(error, expected):
    class Model:
        @classmethod
        def from_pretrained(cls, source, subfolder, **kwargs):
            assert (source, subfolder, kwargs) == ("/m", "vae", {"revision": None})
            raise error

    if expected is None:
        with pytest.raises(type(error)):
            plugin_api.guarded_load(Model, "/m", "vae", revision=None)
    else:
        with pytest.raises(UserError, match=f"model.pretrained '/m'.*{expected}"):
            plugin_api.guarded_load(Model, "/m", "vae", revision=None)


FAMILY = plugin_api.ModelFamily(
    name="Toy",
    pipeline="ToyEditPipeline",
    pipeline_prefix="Toy",
    trainer="toy",
    example="owner/toy",
    layout="a Toy folder has transformer/ and tokenizer/",
    components={
        "transformer": plugin_api.Component(accepted=("ToyTransformer",)),
        "text_encoder": plugin_api.Component(key="model_type", accepted=("t5",), expected="a T5 encoder"),
        "tokenizer": plugin_api.Component(files=()),
        "processor": plugin_api.Component(files=("processor_config.json", "preprocessor_config.json"), key=None),
    },
)


def _folder(tmp_path: Path, pipeline: str = "ToyEditPipeline", transformer: str = "ToyTransformer") -> Path:
    files = {
        "model_index.json": {"_class_name": pipeline},
        "transformer/config.json": {"_class_name": transformer},
        "text_encoder/config.json": {"model_type": "t5"},
        "processor/preprocessor_config.json": {},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "tokenizer").mkdir()
    return tmp_path


def test_check_model_accepts_the_declared_layout(tmp_path, caplog):
    folder = str(_folder(tmp_path))
    plugin_api.check_model(folder, FAMILY)
    assert plugin_api.read_component_config(folder, FAMILY, "transformer") == {"_class_name": "ToyTransformer"}
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
    plugin_api.check_model(folder, FAMILY, ("transformer",))
    assert "is a ToyPipeline folder; the toy trainer expects ToyEditPipeline" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "family",
            r"is a OtherPipeline folder, not Toy \(model_index.json\); the toy trainer needs a "
            r"ToyEditPipeline folder such as owner/toy",
        ),
        (
            "class",
            r"is not a Toy model: transformer/config.json has _class_name 'OtherTransformer', expected "
            r"ToyTransformer",
        ),
        ("no transformer", r"missing the component 'transformer' \(transformer/config.json not found\); a Toy"),
        ("no tokenizer", r"missing the component 'tokenizer' \(no tokenizer/\)"),
        ("no processor", r"missing the component 'processor' \(processor/processor_config.json not found\)"),
        ("bad json", r"text_encoder/config.json is not valid JSON"),
    ],
)
def test_check_model_refusals(tmp_path, change, message):
    import shutil

    folder = _folder(
        tmp_path,
        pipeline="OtherPipeline" if change == "family" else "ToyEditPipeline",
        transformer="OtherTransformer" if change == "class" else "ToyTransformer",
    )
    if change.startswith("no "):
        shutil.rmtree(folder / change[3:])
    if change == "bad json":
        (folder / "text_encoder" / "config.json").write_text("{")
    with pytest.raises(UserError, match=message):
        plugin_api.check_model(str(folder), FAMILY)


def test_check_model_reads_the_hub(monkeypatch, tmp_path):
    from qflux import modeling

    folder = _folder(tmp_path)
    asked = []

    def hub_file(source, filename, subfolder, revision):
        asked.append((source, subfolder, filename, revision))
        file = folder / (subfolder or "") / filename
        if not file.is_file():
            raise OSError(f"404 {filename}")
        return file

    monkeypatch.setattr(modeling, "_hub_file", hub_file)
    plugin_api.check_model("owner/toy", FAMILY, ("transformer", "tokenizer", "processor"), revision="r1")
    assert asked == [
        ("owner/toy", None, "model_index.json", "r1"),
        ("owner/toy", "transformer", "config.json", "r1"),
        ("owner/toy", "processor", "processor_config.json", "r1"),  # the first name is missing: the next one
        ("owner/toy", "processor", "preprocessor_config.json", "r1"),
    ]
    (folder / "text_encoder" / "config.json").unlink()
    with pytest.raises(
        UserError,
        match=r"cannot read text_encoder/config.json from the hub \(revision main\): "
        r"OSError: 404.*hf download owner/toy",
    ):
        plugin_api.check_model("owner/toy", FAMILY, ("text_encoder",))


def test_flow_match_timesteps_are_the_pipelines():
    diffusers = pytest.importorskip("diffusers")
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = {
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "use_dynamic_shifting": True,
    }
    ours = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    timesteps = plugin_api.flow_match_timesteps(ours, 4, 1024, "cpu")
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    expected, _ = retrieve_timesteps(theirs, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    assert timesteps.tolist() == expected.tolist() and ours.begin_index == 0


def test_mask_to_tokens_is_the_loss_one():
    from qflux.loss import mask_to_tokens

    assert plugin_api.mask_to_tokens is mask_to_tokens
