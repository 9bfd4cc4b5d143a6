"""The plugin registry: in-process plugin objects, registration, dispatch, and real entry-point discovery
(fake installed distributions on PYTHONPATH, ``python -m qflux plugins list --json`` in a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qflux
from qflux.config.schema import LossConfig, ModelConfig
from qflux.errors import PluginError, UserError
from qflux.plugin_api import Quantizer, QuantizerInfo, Trainer, TrainerInfo
from qflux.plugins import build_registry


def trainer_plugin(name: str, answer: str, package: str | None = None):
    """A class-based plugin providing trainer ``name`` whose ``load_transformer`` answers ``answer``."""

    class AnswerTrainer(Trainer):
        info = TrainerInfo(name=name, family=name, description=f"test trainer {name}", pipeline="none")

        def load_transformer(self, model):
            return answer

    class Plugin:
        __package__ = package

        @qflux.hookimpl
        def qflux_register_trainers(self, register):
            register(AnswerTrainer())

    return Plugin()


class NoopQuantizer(Quantizer):
    """A registered quantizer that leaves the transformer as it is."""

    def quantize(self, transformer, model):
        return transformer


def hooks_implemented_by(plugin) -> list[str]:
    """The hook names a plugin object really implements (its ``@qflux.hookimpl`` functions)."""
    out = []
    for attr in dir(plugin):
        opts = getattr(getattr(plugin, attr, None), "qflux_impl", None)
        if isinstance(opts, dict):
            out.append(opts.get("specname") or attr)
    return sorted(out)


# --------------------------------------------------------------------------- in-process registration


def test_core_alone_has_no_trainers_but_a_default_loss() -> None:
    registry = build_registry(load_entry_points=False)
    assert registry.plugins == [] and registry.broken == [] and registry.trainers == {} and registry.quantizers == {}
    # the core's own: the default loss and adapters, and the train.ema callback
    assert [name for name, _ in registry.pm.list_name_plugin()] == ["qflux.default", "qflux.ema"]
    with pytest.raises(PluginError, match=r"unknown trainer 'kontext' \(installed trainers: none\).*pip install qflux-kontext"):
        registry.trainer("kontext")


def test_trainers_and_quantizers_are_registered_with_their_plugin(toy_plugin) -> None:
    registry = build_registry(extra_plugins=[("toy", toy_plugin), ("b", trainer_plugin("bee", "B", "qflux-bee"))],
                              load_entry_points=False)
    assert set(registry.trainers) == {"toy", "bee"} and set(registry.quantizers) == {"toy-round"}
    assert registry.trainer("toy") is toy_plugin.TOY
    assert isinstance(registry.quantizer("toy-round"), Quantizer)
    toy, bee = registry.plugins
    assert (toy.name, toy.kind, toy.trainers, toy.quantizers) == ("toy", "trainer", ["toy"], ["toy-round"])
    assert (bee.name, bee.package, bee.kind, bee.trainers) == ("b", "qflux-bee", "trainer", ["bee"])
    assert registry.provider == {"trainer:toy": "toy", "quantizer:toy-round": "toy", "trainer:bee": "qflux-bee",
                                 "adapter:lora": "qflux-core", "adapter:lokr": "qflux-core", "adapter:loha": "qflux-core"}
    # each plugin lists exactly the hooks it implements
    assert toy.hooks == hooks_implemented_by(toy_plugin)
    assert bee.hooks == ["qflux_register_trainers"]


def test_kind_of_a_plugin() -> None:
    class Quant:
        @qflux.hookimpl
        def qflux_register_quantizers(self, register):
            register(NoopQuantizer(QuantizerInfo(name="q8", description="test")))

    class Other:
        @qflux.hookimpl
        def qflux_loss(self, prediction, noisy, batch, loss):
            return None

    registry = build_registry(extra_plugins=[("q", Quant()), ("o", Other())], load_entry_points=False)
    assert [(p.name, p.kind) for p in registry.plugins] == [("q", "quantizer"), ("o", "other")]
    with pytest.raises(PluginError, match=r"unknown quantizer 'nf4'.*\(installed: q8\).*pip install qflux-quant"):
        registry.quantizer("nf4")


def test_same_trainer_name_from_two_packages_is_an_error_naming_both() -> None:
    first, second = trainer_plugin("kontext", "A", "qflux-kontext"), trainer_plugin("kontext", "B", "my-kontext-fork")
    with pytest.raises(PluginError) as info:
        build_registry(extra_plugins=[("a", first), ("b", second)], load_entry_points=False)
    msg = str(info.value)
    assert "trainer name 'kontext'" in msg and "qflux-kontext" in msg and "my-kontext-fork" in msg
    assert isinstance(info.value, UserError)


def test_same_quantizer_name_from_two_packages_is_an_error_naming_both() -> None:
    def quant(package):
        class Quant:
            __package__ = package

            @qflux.hookimpl
            def qflux_register_quantizers(self, register):
                register(NoopQuantizer(QuantizerInfo(name="nf4", description="test")))

        return Quant()

    with pytest.raises(PluginError, match="quantizer name 'nf4' is registered by two packages: qflux-quant and other-quant"):
        build_registry(extra_plugins=[("a", quant("qflux-quant")), ("b", quant("other-quant"))], load_entry_points=False)


def test_the_core_calls_the_selected_trainer_object() -> None:
    registry = build_registry(
        extra_plugins=[("a", trainer_plugin("alpha", "from alpha")), ("b", trainer_plugin("beta", "from beta"))],
        load_entry_points=False,
    )
    model = ModelConfig()
    assert registry.trainer("alpha").load_transformer(model) == "from alpha"
    assert registry.trainer("beta").load_transformer(model) == "from beta"
    assert [p.hooks for p in registry.plugins] == [["qflux_register_trainers"]] * 2  # no stage hooks to guard


def test_a_stage_a_trainer_lacks_is_a_one_line_user_error() -> None:
    from qflux.trainer import Unsupported

    trainer = build_registry(extra_plugins=[("a", trainer_plugin("alpha", "x"))], load_entry_points=False).trainer(
        "alpha")
    assert trainer.implements("load_transformer") and not trainer.implements("sample")
    with pytest.raises(Unsupported, match=r"trainer 'alpha' cannot generate images .*Trainer.sample") as err:
        trainer.sample(None, None)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    with pytest.raises(Unsupported, match=r"cannot encode training samples .*which qflux cache needs"):
        trainer.require("load_transformer", "encode", why="qflux cache")


def test_default_loss_is_replaced_by_a_plugin_loss() -> None:
    import torch

    from qflux.loss import flow_matching_loss
    from qflux.types import Batch, NoisyInput, PromptEmbeds

    class L1:
        @qflux.hookimpl
        def qflux_loss(self, prediction, noisy):
            return (prediction - noisy.target).abs().mean()

    torch.manual_seed(0)
    prediction, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 1]])
    batch = Batch(keys=["a", "b"], latents=torch.zeros(2, 4, 3), grid=(2, 2), prompt=PromptEmbeds(torch.zeros(2, 1, 1)),
                  mask=mask)
    noisy = NoisyInput(latents=torch.zeros(2, 4, 3), sigmas=torch.full((2,), 0.3), target=target)
    kwargs = dict(prediction=prediction, noisy=noisy, batch=batch, loss=LossConfig())

    default = build_registry(load_entry_points=False).hook.qflux_loss(**kwargs)
    torch.testing.assert_close(default, flow_matching_loss(prediction, target, mask, 2.0, 1.0))
    replaced = build_registry(extra_plugins=[("l1", L1())], load_entry_points=False).hook.qflux_loss(**kwargs)
    torch.testing.assert_close(replaced, (prediction - target).abs().mean())
    assert not torch.allclose(default, replaced)


def test_a_full_toy_run_through_the_trainer(toy_plugin) -> None:
    """load -> quantize -> encoders -> encode -> collate -> predict -> default loss -> backward -> sample."""
    import torch
    from PIL import Image

    from qflux.training.batching import collate
    from qflux.types import EditSample, ModelBundle, NoisyInput, SampleRequest

    registry = build_registry(extra_plugins=[("toy", toy_plugin)], load_entry_points=False)
    hook, trainer = registry.hook, registry.trainer("toy")
    model = ModelConfig(dtype="float32", quantize="toy-round")
    transformer = trainer.load_transformer(model)
    quantized = registry.quantizer(model.quantize).quantize(transformer, model)
    assert quantized is transformer and torch.equal(transformer.weight * 8, torch.round(transformer.weight * 8))

    encoders = trainer.load_encoders(model)
    samples = [
        EditSample(key=k, prompt=f"paint it {c}", target=Image.new("RGB", (48, 32), c),
                   controls=[Image.new("RGB", (48, 32), "white")], mask=Image.new("L", (48, 32), 255 * (k == "a")))
        for k, c in (("a", "red"), ("b", "green"))
    ]
    encoded = trainer.encode(encoders, samples, model, False)
    assert [e.key for e in encoded] == ["a", "b"] and encoded[0].grid == (2, 3) and encoded[0].empty_prompt is None
    assert encoded[0].mask.tolist() == [1.0] * 6 and encoded[1].mask.tolist() == [0.0] * 6
    batch = collate(encoded)

    lora = torch.nn.Parameter(torch.zeros(3, 3))  # stands in for the LoRA the core attaches
    noise = torch.randn_like(batch.latents)
    noisy = NoisyInput(latents=0.5 * batch.latents + 0.5 * noise, sigmas=torch.full((2,), 0.5),
                       target=noise - batch.latents)
    prediction = trainer.predict(transformer, batch, noisy, model)
    prediction = prediction + noisy.latents @ lora
    loss = hook.qflux_loss(prediction=prediction, noisy=noisy, batch=batch, loss=LossConfig())
    loss.backward()
    assert loss.item() > 0 and lora.grad is not None and lora.grad.abs().sum() > 0

    bundle = ModelBundle(trainer=trainer, model=model, transformer=transformer, encoders=encoders)
    image = trainer.sample(bundle, SampleRequest(prompt="p", height=32, width=64, seed=3))
    assert image.size == (64, 32)


@pytest.mark.parametrize(
    ("plugin_src", "error"),
    [
        ("class P:\n    @qflux.hookimpl\n    def qflux_register_trainer(self, register):\n        return 1\n",
         "qflux_register_trainer is not a qflux hook (did you mean qflux_register_trainers?)"),
        ("class P:\n    @qflux.hookimpl\n    def qflux_loss(self, prediction, modell):\n        return 1\n",
         "modell"),
        ("class P:\n    @qflux.hookimpl\n    def qflux_register_trainers(self, register):\n        register('kontext')\n",
         "register() takes a Trainer, got str"),
        ("class P:\n    @qflux.hookimpl\n    def qflux_register_trainers(self, register):\n"
         "        register(TrainerInfo(name='old', family='f', description='', pipeline='none'))\n",
         "register() takes a Trainer, got TrainerInfo (since qflux 0.3 a plugin registers a Trainer object"),
        ("class P:\n    @qflux.hookimpl\n    def qflux_register_trainers(self, register):\n"
         "        register(Trainer(TrainerInfo(name='half', family='f', description='', pipeline='none')))\n"
         "        raise RuntimeError('registration failed')\n",
         "RuntimeError: registration failed"),
    ],
    ids=["misspelt-hook", "unknown-argument", "register-wrong-type", "register-old-info", "register-raises"],
)
def test_a_bad_plugin_is_reported_as_broken_and_registers_nothing(plugin_src: str, error: str) -> None:
    namespace = {"qflux": qflux, "TrainerInfo": TrainerInfo, "Trainer": Trainer}
    exec(plugin_src, namespace)
    registry = build_registry(extra_plugins=[("bad", namespace["P"]()), ("good", trainer_plugin("ok", "x"))],
                              load_entry_points=False)
    [broken] = registry.broken
    assert broken.name == "bad" and error in broken.error
    assert [p.name for p in registry.plugins] == ["good"] and set(registry.trainers) == {"ok"}
    assert registry.pm.get_plugin("bad") is None  # nothing of it stays registered
    assert registry.trainer("ok").load_transformer(ModelConfig()) == "x"


def test_unknown_trainer_of_an_installed_but_broken_package_shows_its_error(fake_dist, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process entry-point discovery: when qflux-kontext is installed but its plugin fails to import, asking
    for trainer kontext shows that error instead of advising to pip install it."""
    root = fake_dist(tmp_path, "qflux-kontext", "9.9", {"kontext_test": "qflux_kontext_broken_test"},
                     {"qflux_kontext_broken_test.py": "raise ImportError('needs a newer diffusers')\n"})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("QFLUX_LOAD_PLUGINS", "kontext_test")
    registry = build_registry()
    assert [(b.name, b.package, b.error) for b in registry.broken] == [
        ("kontext_test", "qflux-kontext", "ImportError: needs a newer diffusers")]
    with pytest.raises(PluginError) as info:
        registry.trainer("kontext")
    assert "qflux-kontext" in str(info.value) and "failed to load: ImportError: needs a newer diffusers" in str(info.value)


def test_two_packages_with_the_same_plugin_name(fake_dist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process discovery: the first plugin of a name loads, the other package's is reported, naming the first."""
    src = "import qflux\n\n@qflux.hookimpl\ndef qflux_loss(prediction):\n    return None\n"
    fake_dist(tmp_path / "a", "qflux-same-a", "1.0", {"same_name": "same_a"}, {"same_a.py": src})
    fake_dist(tmp_path / "b", "qflux-same-b", "1.0", {"same_name": "same_b"}, {"same_b.py": src})
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.setenv("QFLUX_LOAD_PLUGINS", "same_name")
    registry = build_registry()
    assert [(p.name, p.package) for p in registry.plugins] == [("same_name", "qflux-same-a")]
    assert [(b.name, b.package, b.error) for b in registry.broken] == [
        ("same_name", "qflux-same-b", "PluginError: the plugin name 'same_name' is already used by qflux-same-a")]


# --------------------------------------------------------------------------- real entry-point discovery


def plugins_json(result) -> dict:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def test_plugins_list_reports_a_plugin_that_raises_on_import(run_qflux, plugin_path: Path, toy_plugin) -> None:
    listing = plugins_json(run_qflux("plugins", "list", "--json", plugins="toy,broken", pythonpath=[plugin_path]))
    assert listing["broken"] == [{"name": "broken", "package": "qflux-broken",
                                  "error": "RuntimeError: this plugin is broken on purpose"}]
    [toy] = listing["plugins"]
    assert toy == {
        "name": "toy", "package": "qflux-toy", "version": "1.0.0", "kind": "trainer", "provides": ["toy", "toy-round"],
        "trainers": ["toy"], "quantizers": ["toy-round"], "adapters": [], "hooks": hooks_implemented_by(toy_plugin),
    }
    assert listing["trainers"] == ["toy"] and listing["quantizers"] == ["toy-round"]
    # the table form keeps working too, and names the broken plugin with its error
    table = run_qflux("plugins", "list", plugins="toy,broken", pythonpath=[plugin_path])
    assert table.returncode == 0 and "Traceback" not in table.stderr + table.stdout
    assert "qflux-toy" in table.stdout and "broken" in table.stdout and "broken on purpose" in table.stdout


def test_load_plugins_allow_list(run_qflux, plugin_path: Path) -> None:
    only_toy = plugins_json(run_qflux("plugins", "list", "--json", plugins="toy", pythonpath=[plugin_path]))
    assert [p["name"] for p in only_toy["plugins"]] == ["toy"] and only_toy["broken"] == []
    only_broken = plugins_json(run_qflux("plugins", "list", "--json", plugins=" broken ,", pythonpath=[plugin_path]))
    assert only_broken["plugins"] == [] and [b["name"] for b in only_broken["broken"]] == ["broken"]
    none = plugins_json(run_qflux("plugins", "list", "--json", plugins="", pythonpath=[plugin_path]))
    # the core's own adapters (lora, lokr, loha) are always there
    assert none == {"plugins": [], "broken": [], "trainers": [], "quantizers": [], "adapters": ["loha", "lokr", "lora"],
                    "aliases": {}}
    # unset: every installed plugin is found (whatever else is installed in this environment)
    everything = plugins_json(run_qflux("plugins", "list", "--json", plugins=None, pythonpath=[plugin_path]))
    assert {"toy"} <= {p["name"] for p in everything["plugins"]}
    assert {"broken"} <= {b["name"] for b in everything["broken"]}


def test_listed_hooks_are_exactly_the_implemented_ones(run_qflux, fake_dist, tmp_path: Path) -> None:
    partial = (
        "import qflux\nfrom qflux.plugin_api import Trainer, TrainerInfo\n\n"
        "@qflux.hookimpl\ndef qflux_register_trainers(register):\n"
        "    register(Trainer(TrainerInfo(name='part', family='p', description='', pipeline='none')))\n\n"
        "@qflux.hookimpl\ndef qflux_on_step(event):\n    return None\n\n"
        "def qflux_on_export(event):  # not decorated: not a hook implementation\n    return None\n"
    )
    other = "import qflux\n\n@qflux.hookimpl(specname='qflux_loss')\ndef my_loss(prediction):\n    return prediction\n"
    root = fake_dist(tmp_path / "site", "qflux-partial", "0.3.0", {"part": "qflux_partial", "lossy": "qflux_lossy"},
                     {"qflux_partial.py": partial, "qflux_lossy.py": other})
    listing = plugins_json(run_qflux("plugins", "list", "--json", plugins="part,lossy", pythonpath=[root]))
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert by_name["part"]["hooks"] == ["qflux_on_step", "qflux_register_trainers"]
    assert by_name["lossy"]["hooks"] == ["qflux_loss"] and by_name["lossy"]["kind"] == "other"
    assert by_name["lossy"]["package"] == "qflux-partial" and by_name["lossy"]["version"] == "0.3.0"


def test_entry_point_to_an_object_in_a_module(run_qflux, fake_dist, tmp_path: Path) -> None:
    src = ("import qflux\nfrom qflux.plugin_api import Quantizer, QuantizerInfo\n\n"
           "class Q4(Quantizer):\n    def quantize(self, transformer, model):\n        return transformer\n\n"
           "class Quant:\n    @qflux.hookimpl\n"
           "    def qflux_register_quantizers(self, register):\n"
           "        register(Q4(QuantizerInfo(name='q4', description='test')))\n\nplugin = Quant()\n")
    root = fake_dist(tmp_path / "site", "qflux-q4", "2.0", {"q4": "qflux_q4:plugin"}, {"qflux_q4.py": src})
    listing = plugins_json(run_qflux("plugins", "list", "--json", plugins="q4", pythonpath=[root]))
    assert [(p["name"], p["kind"], p["provides"], p["hooks"]) for p in listing["plugins"]] == [
        ("q4", "quantizer", ["q4"], ["qflux_register_quantizers"])]


def test_two_installed_packages_with_the_same_trainer_name(run_qflux, fake_dist, tmp_path: Path) -> None:
    src = ("import qflux\nfrom qflux.plugin_api import Trainer, TrainerInfo\n\n@qflux.hookimpl\ndef qflux_register_trainers(register):\n"
           "    register(Trainer(TrainerInfo(name='twin', family='t', description='', pipeline='none')))\n")
    root = tmp_path / "site"
    fake_dist(root, "qflux-twin-a", "1.0", {"twin_a": "twin_a"}, {"twin_a.py": src})
    fake_dist(root, "qflux-twin-b", "1.0", {"twin_b": "twin_b"}, {"twin_b.py": src})
    config = tmp_path / "c.yaml"
    config.write_text("trainer: twin\n")
    result = run_qflux("config", "check", config, plugins="twin_a,twin_b", pythonpath=[root])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "trainer name 'twin' is registered by two packages: qflux-twin-a and qflux-twin-b" in result.stderr
    ok = run_qflux("config", "check", config, plugins="twin_a", pythonpath=[root])  # the allow-list resolves it
    assert ok.returncode == 0, ok.stderr


def test_an_adapter_kind_missing_a_method_is_a_broken_plugin() -> None:
    """``Adapter``'s methods without a body are abstract: a kind that cannot export (or attach, save, load) is
    refused when its plugin registers it, listed as broken, and the core's lora stays."""
    from qflux.plugin_api import Adapter

    class HalfAdapter(Adapter):
        name = "half"

        def attach(self, transformer, options):
            return []

    class Plugin:
        @qflux.hookimpl
        def qflux_register_adapters(self, register):
            register(HalfAdapter())

    registry = build_registry(extra_plugins=[("half", Plugin())], load_entry_points=False)
    [broken] = registry.broken
    assert broken.name == "half" and "abstract" in broken.error and "export" in broken.error
    assert set(registry.adapters) == {"lora", "lokr", "loha"}
