"""An adapter kind registered by a plugin trains, checkpoints, resumes and exports with no change to the core:
the proof that LoKr / LoHa can come as plugins (issue 15).

The adapter is tests/fixtures/toy_adapter_plugin.py's ``toy-scale``: a trainable per-output-channel scale and
shift on targeted Linear layers, applied by a forward hook, its parameters named ``<module>.toy_scale`` /
``<module>.toy_shift`` (nothing LoRA-shaped, no ``lora_`` in any name), its file ``toy_scale_adapter.safetensors``.
Every run is the real tiny FLUX.1 Kontext trainer (``builtin:tiny``, 32 px, a few steps, no validation images).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import qflux
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import single_torch_thread, tiny_config, write_config
from qflux.training import checkpoint as ckpt

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "toy_adapter_plugin.py"
TARGETS = ["to_q", "to_v"]
STEPS, SAVE_EVERY = 4, 2


def import_fixture():
    name = "qflux_test_toy_adapter_plugin"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FIXTURE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def adapter_plugin():
    return import_fixture()


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


class StepSpy:
    """A run-callback plugin: what ``qflux_on_step`` hands plugins at each step (the live transformer, the
    adapter object, its trainable parameters)."""

    def __init__(self) -> None:
        self.events = []

    @qflux.hookimpl
    def qflux_on_step(self, event):
        self.events.append(event)


def make_config(root: Path, out: str, *, max_steps: int = STEPS, **model):
    """A tiny kontext config with ``model.adapter: toy-scale``; every run of this module shares one cache."""
    config = tiny_config(root, model={"adapter": "toy-scale",
                                      "adapter_options": {"targets": TARGETS, "init": 0.0}, **model},
                         train={"max_steps": max_steps, "save_every": SAVE_EVERY, "batch_size": 2},
                         cache={"enabled": True, "dir": str(root / "cache")}, output={"dir": str(root / out)})
    return load_config(write_config(root / f"{out}.yaml", config))


def registry_with(plugin, *more):
    return build_registry(extra_plugins=[("toyadapter", plugin), *more])


def targeted(transformer) -> list[str]:
    """The names of the Linear layers of ``transformer`` the options target (peft's suffix rule)."""
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n == t or n.endswith("." + t) for t in TARGETS)]


@pytest.fixture(scope="module")
def trained(adapter_plugin, tmp_path_factory):
    """One run of STEPS steps (checkpoints every SAVE_EVERY), with the spy; shared by the tests below."""
    root = tmp_path_factory.mktemp("toy_scale")
    config = make_config(root, "run")
    spy = StepSpy()
    registry = registry_with(adapter_plugin, ("spy", spy))
    with single_torch_thread():
        result = train(config, registry=registry)
    trainer = registry.trainer(config.trainer)
    base = trainer.load_transformer(config.model)  # the pristine base, for comparison
    return SimpleNamespace(root=root, config=config, registry=registry, result=result, spy=spy, base=base,
                           adapter=registry.adapter("toy-scale"), trainer=trainer)


def expected_keys(base) -> set[str]:
    return {f"{n}.{kind}" for n in targeted(base) for kind in ("toy_scale", "toy_shift")}


# --------------------------------------------------------------------------- training


def test_the_plugin_adapter_is_registered_and_selected(trained, adapter_plugin):
    assert "toy-scale" in trained.registry.adapters and "lora" in trained.registry.adapters
    assert trained.registry.provider["adapter:toy-scale"] == "toyadapter"
    record = next(p for p in trained.registry.plugins if p.name == "toyadapter")
    assert (record.kind, record.adapters) == ("adapter", ["toy-scale"])
    # the core handed the run callbacks the plugin's adapter object, not its own lora
    assert trained.spy.events and all(e.adapter is adapter_plugin.TOY_SCALE for e in trained.spy.events)


def test_it_trains_its_own_tensors_and_leaves_the_base_alone(trained):
    result, base = trained.result, trained.base
    assert len(result.losses) == STEPS and all(math.isfinite(v) for v in result.losses)
    assert result.steps == STEPS
    keys = expected_keys(base)
    assert len(targeted(base)) >= 4 and set(result.lora) == keys  # final tensors: exactly the adapter's
    assert not any("lora_" in k for k in keys)
    # the adapter's tensors moved away from their init (scale init 0.0, shift 0)
    assert all(result.lora[k].abs().max() > 0 for k in keys), [k for k in keys if not result.lora[k].any()]
    # the live transformer of the last step: the optimizer's parameters are exactly the adapter's ...
    last = trained.spy.events[-1]
    live = dict(last.transformer.named_parameters())
    trainable = {n for n, p in live.items() if p.requires_grad}
    assert trainable == keys
    assert {id(p) for p in last.params} == {id(live[k]) for k in keys}
    # ... and every base weight is bitwise what the trainer loaded
    pristine = dict(base.named_parameters())
    assert set(live) - keys == set(pristine)
    changed = [n for n, p in pristine.items() if not torch.equal(p, live[n].detach().cpu())]
    assert changed == []


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_hold_exactly_the_adapter_tensors(trained):
    run = Path(trained.config.output.dir)
    steps = [p.name for p in ckpt.list_checkpoints(run)]
    assert steps == [f"step-{s:06d}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    keys = expected_keys(trained.base)
    for path in ckpt.list_checkpoints(run):
        assert ckpt.verify(path) is None
        saved = load_file(str(path / ckpt.LORA))
        assert saved and set(saved) == keys, path  # not empty, nothing dropped, nothing extra
        with safe_open(str(path / ckpt.LORA), framework="pt") as f:
            header = f.metadata()
        assert header["qflux.adapter"] == "toy-scale"  # the adapter's checkpoint_metadata reached the header
    last = load_file(str(ckpt.checkpoint_dir(run, STEPS) / ckpt.LORA))
    assert all(torch.equal(last[k], trained.result.lora[k]) for k in keys)
    first = load_file(str(ckpt.checkpoint_dir(run, SAVE_EVERY) / ckpt.LORA))
    assert any(not torch.equal(first[k], last[k]) for k in keys)  # each checkpoint is of its own step


# --------------------------------------------------------------------------- resume


def test_resume_is_bitwise_the_uninterrupted_run(trained, adapter_plugin):
    """STEPS steps in one run == SAVE_EVERY steps, then ``--resume`` with train.max_steps raised to STEPS."""
    short = make_config(trained.root, "short", max_steps=SAVE_EVERY)
    with single_torch_thread():
        first = train(short, registry=registry_with(adapter_plugin))
        assert first.steps == SAVE_EVERY
        longer = make_config(trained.root, "short", max_steps=STEPS)
        resumed = train(longer, registry=registry_with(adapter_plugin), resume=True)
    assert resumed.resumed_from == ckpt.checkpoint_dir(Path(longer.output.dir), SAVE_EVERY)
    assert resumed.steps == STEPS
    assert resumed.losses == trained.result.losses[SAVE_EVERY:]
    reference = trained.result.lora
    assert reference and resumed.lora.keys() == reference.keys()
    assert all(torch.equal(reference[k], resumed.lora[k]) for k in reference)
    exported = load_file(str(resumed.lora_path))
    assert all(torch.equal(reference[k], exported[k]) for k in reference)


# --------------------------------------------------------------------------- export and inference


def test_it_exports_its_file_and_the_file_loads_for_inference(trained, adapter_plugin):
    from qflux.run.models import Selection, inference_bundle

    run = Path(trained.config.output.dir)
    path = trained.result.lora_path
    assert path == run / adapter_plugin.FILE_NAME and path.is_file()
    assert not (run / "pytorch_lora_weights.safetensors").exists()  # the core wrote no LoRA file of its own
    assert not list(run.glob(".*.tmp"))  # the atomic write left no temporary file
    exported = load_file(str(path))
    assert set(exported) == set(trained.result.lora) and exported
    assert all(torch.equal(exported[k], trained.result.lora[k]) for k in exported)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert header["qflux.adapter"] == "toy-scale" and header["qflux.family"] == trained.trainer.info.family
    assert "qflux.training_sizes" in header  # the core's extra_metadata reached the file

    # what qflux sample does with --lora FILE: the base with the file applied through the adapter's load_file
    bundle = inference_bundle(Selection.of(trained.config, trained.registry), trained.config, path)
    applied = trained.adapter.state_dict(bundle.transformer)
    assert applied.keys() == exported.keys() and all(torch.equal(applied[k], exported[k]) for k in exported)
    assert not any(p.requires_grad for p in bundle.transformer.parameters())


def test_the_adapter_changes_the_forward(trained, adapter_plugin):
    """The file is not inert: the transformer with it applied computes something else than the base."""
    from qflux.run.models import Selection, load_base

    selection = Selection.of(trained.config, trained.registry)
    adapted = load_base(selection, trained.config)
    trained.adapter.load_file(adapted, trained.result.lora_path)
    name = targeted(trained.base)[0]
    x = torch.randn(3, trained.base.get_submodule(name).in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(trained.base.get_submodule(name)(x), adapted.get_submodule(name)(x))


# --------------------------------------------------------------------------- config errors (the real CLI)


@pytest.fixture
def adapter_dist(fake_dist, tmp_path):
    """An installed fake distribution ``qflux-toy-scale`` (entry point ``toyadapter``) holding the fixture."""
    return fake_dist(tmp_path / "site", "qflux-toy-scale", "0.1.0", {"toyadapter": "qflux_toy_scale"},
                     {"qflux_toy_scale.py": FIXTURE.read_text()})


def write_cli_config(tmp_path: Path, **model) -> Path:
    config = tiny_config(tmp_path, model=model)
    return write_config(tmp_path / "c.yaml", config)


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    err = result.stderr.strip()
    assert err.startswith("error:"), err
    return err


def test_cli_finds_the_adapter_through_its_entry_point(run_qflux, adapter_dist, tmp_path):
    path = write_cli_config(tmp_path, adapter="toy-scale", adapter_options={"targets": TARGETS})
    result = run_qflux("config", "check", path, plugins="kontext,toyadapter", pythonpath=[adapter_dist])
    assert result.returncode == 0, result.stderr
    listing = run_qflux("plugins", "list", "--json", plugins="toyadapter", pythonpath=[adapter_dist])
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["adapters"] == ["loha", "lokr", "lora", "toy-scale"]


def test_a_misspelt_adapter_option_is_one_config_error_with_a_did_you_mean(run_qflux, adapter_dist, tmp_path):
    path = write_cli_config(tmp_path, adapter="toy-scale", adapter_options={"targts": TARGETS})
    err = one_error_line(run_qflux("config", "check", path, plugins="kontext,toyadapter", pythonpath=[adapter_dist]))
    [mistake] = [line for line in err.splitlines() if "targts" in line]  # the one mistake, on one line
    assert "model.adapter_options.targts" in mistake
    assert "did you mean 'model.adapter_options.targets'?" in mistake
    assert "toy-scale adapter takes: targets, init" in mistake
    assert len(err.splitlines()) <= 2, err  # "invalid config" and the one mistake, as for the core's keys
    # the same check in-process: a ConfigError (exit code 2), before anything is loaded
    from qflux.errors import ConfigError
    from qflux.run.preflight import check_config

    with pytest.raises(ConfigError, match=r"did you mean 'model.adapter_options.targets'") as info:
        check_config(load_config(path), registry_with(import_fixture()))
    assert info.value.exit_code == 2


def test_an_unknown_adapter_name_is_exit_2_naming_the_installed_ones(run_qflux, adapter_dist, tmp_path):
    path = write_cli_config(tmp_path, adapter="toy-scal", adapter_options={"targets": TARGETS})
    err = one_error_line(run_qflux("config", "check", path, plugins="kontext,toyadapter", pythonpath=[adapter_dist]))
    assert len(err.splitlines()) == 1, err
    assert "unknown adapter 'toy-scal'" in err and "installed: loha, lokr, lora, toy-scale" in err
    assert "did you mean 'toy-scale'?" in err
    # and the same name without the plugin installed: only the core's adapter is offered
    err = one_error_line(run_qflux("config", "check", path, plugins="kontext"))
    assert "unknown adapter 'toy-scal'" in err and "installed: loha, lokr, lora)" in err


# --------------------------------------------------------------------------- run folder of a plugin adapter


def test_resuming_a_complete_run_does_nothing(trained, adapter_plugin):
    """``--resume`` of a run that is complete at max_steps with its adapter exported: nothing to do (as for
    lora), not a reload of every model and a second export."""
    with single_torch_thread():
        again = train(trained.config, registry=registry_with(adapter_plugin), resume=True)
    assert again.steps == STEPS and again.losses == []
    assert again.val_loss_start is None  # returned before loading anything
    assert (Path(trained.config.output.dir) / "metrics.jsonl").read_text().count("resumed_from") == 0
