"""The one place that builds the plugin manager and the trainer / quantizer / adapter registries.

Plugins hand the core objects (``Trainer``, ``Quantizer``, ``Adapter``) through the registration hooks; the
core then calls the selected object's methods. pluggy carries discovery, the loss and the run callbacks.

Plugins are found through the entry-point group ``qflux``. A plugin that fails to import is recorded as
broken (name, package, error) instead of crashing the CLI. ``QFLUX_LOAD_PLUGINS=a,b`` (entry-point names)
restricts loading to those plugins; set it to an empty string to load none.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from qflux import hookspecs
from qflux.adapters.base import Adapter
from qflux.errors import PluginError
from qflux.known import KNOWN_QUANTIZERS, KNOWN_TRAINERS, TRAINER_ALIASES, aliases_of, canonical_trainer  # noqa: F401 - re-exported
from qflux.quantizer import Quantizer
from qflux.trainer import Trainer

ENTRY_POINT_GROUP = "qflux"
ALLOW_LIST_ENV = "QFLUX_LOAD_PLUGINS"


@dataclass
class PluginRecord:
    """What ``qflux plugins list`` shows for one plugin."""

    name: str
    package: str
    version: str
    hooks: list[str] = field(default_factory=list)
    trainers: list[str] = field(default_factory=list)
    quantizers: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.trainers:
            return "trainer"
        if self.quantizers:
            return "quantizer"
        if self.adapters:
            return "adapter"
        return "other"


@dataclass
class BrokenPlugin:
    name: str
    package: str
    error: str


@dataclass
class Registry:
    """The loaded plugins and what they registered."""

    pm: pluggy.PluginManager
    plugins: list[PluginRecord]
    broken: list[BrokenPlugin]
    trainers: dict[str, Trainer]
    quantizers: dict[str, Quantizer]
    provider: dict[str, str]  # "trainer:NAME" / "quantizer:NAME" / "adapter:NAME" -> package
    allow: set[str] | None = None  # the QFLUX_LOAD_PLUGINS allow-list in effect (None: load all)
    adapters: dict[str, Adapter] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def trainer(self, name: str) -> Trainer:
        """The registered trainer ``name``, or a ``PluginError`` that says what to install."""
        name = canonical_trainer(name)
        if name in self.trainers:
            return self.trainers[name]
        installed = ", ".join(sorted(self.trainers)) or "none"
        msg = f"unknown trainer '{name}' (installed trainers: {installed})"
        close = _close_trainers(name, sorted(set(self.trainers) | set(KNOWN_TRAINERS) | set(TRAINER_ALIASES)))
        if close and name not in KNOWN_TRAINERS:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if name in KNOWN_TRAINERS:
            msg += self._missing(KNOWN_TRAINERS[name])
        elif close and close[0] in KNOWN_TRAINERS and close[0] not in self.trainers:
            msg += self._missing(KNOWN_TRAINERS[close[0]]).replace("; it is", " It is", 1)
        raise PluginError(msg)

    def version_of_trainer(self, name: str) -> str:
        """Version of the package that provides trainer ``name`` (part of embedding-cache keys)."""
        for record in self.plugins:
            if name in record.trainers:
                return f"{record.package}=={record.version}"
        return "unknown"

    def quantizer(self, name: str) -> Quantizer:
        if name in self.quantizers:
            return self.quantizers[name]
        installed = ", ".join(sorted(self.quantizers)) or "none"
        msg = f"unknown quantizer '{name}' for model.quantize (installed: {installed})"
        if name in KNOWN_QUANTIZERS:
            msg += self._missing(KNOWN_QUANTIZERS[name])
        raise PluginError(msg)

    def adapter(self, name: str) -> Adapter:
        if name in self.adapters:
            return self.adapters[name]
        import difflib

        installed = ", ".join(sorted(self.adapters)) or "none"
        close = difflib.get_close_matches(name, sorted(self.adapters), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginError(f"unknown adapter '{name}' for model.adapter (installed: {installed}){hint}")

    def _missing(self, package: str) -> str:
        """What to do about a known name whose package did not provide it."""
        failed = [b for b in self.broken if b.package == package]
        if failed:
            return f"; it is provided by the package {package}, whose plugin failed to load: {failed[0].error}"
        msg = f"; it is provided by the package {package}: pip install {package}"
        if self.allow is not None:
            msg += f" (if it is installed: {ALLOW_LIST_ENV}={','.join(sorted(self.allow))!r} does not load it)"
        return msg


def _close_trainers(name: str, names: list[str]) -> list[str]:
    """Did-you-mean for a trainer name: spelling (``kontex``) or a longer form that holds the name
    (``flux-kontext``, ``qwen-image-edit``)."""
    import difflib

    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    held = [n for n in names if n in name or name.replace("image-", "") == n]
    return list(dict.fromkeys(held + close))[:2]


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def build_registry(extra_plugins: list[tuple[str, object]] = (), load_entry_points: bool = True) -> Registry:
    """Build the plugin manager from entry points (plus ``extra_plugins`` as ``(name, plugin)``, for tests)."""
    from qflux import default_plugin
    from qflux.training.ema import EmaCallback

    pm = pluggy.PluginManager("qflux")
    pm.add_hookspecs(hookspecs)
    records: list[PluginRecord] = []
    broken: list[BrokenPlugin] = []
    loaded: list[tuple[object, PluginRecord]] = []

    allow = _allow_list()
    seen: dict[str, str] = {}  # entry-point name -> package
    if load_entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allow is not None and ep.name not in allow:
                continue
            package, version = _distribution_of(ep)
            if ep.name in seen:
                if seen[ep.name] != package:  # the same package found twice on sys.path is loaded once
                    broken.append(BrokenPlugin(ep.name, package, f"PluginError: the plugin name '{ep.name}' is "
                                               f"already used by {seen[ep.name]}"))
                continue
            seen[ep.name] = package
            try:
                plugin = ep.load()
            except Exception as err:  # noqa: BLE001 - any import failure must be reported, not raised
                broken.append(BrokenPlugin(ep.name, package, f"{type(err).__name__}: {err}"))
                continue
            loaded.append((plugin, PluginRecord(ep.name, package, version)))
    for name, plugin in extra_plugins:
        loaded.append((plugin, PluginRecord(name, getattr(plugin, "__package__", None) or name, "0")))
    from qflux import __version__

    # the core's own implementations (the default loss, the lora adapter) first, so plugins may replace them
    loaded.insert(0, (default_plugin, PluginRecord("qflux.default", "qflux-core", __version__)))
    # train.ema, the core's own run callback: an object per registry, so its state is the registry's run's
    ema = EmaCallback()
    loaded.insert(1, (ema, PluginRecord("qflux.ema", "qflux-core", __version__)))

    trainers: dict[str, Trainer] = {}
    quantizers: dict[str, Quantizer] = {}
    adapters: dict[str, Adapter] = {}
    provider: dict[str, str] = {}

    for plugin, record in loaded:
        try:
            pm.register(plugin, name=record.name)
            _check_hook_names(pm, plugin)
            new_trainers: list[Trainer] = []
            new_quantizers: list[Quantizer] = []
            new_adapters: list[Adapter] = []
            for impl in _impls(pm, plugin, "qflux_register_trainers"):
                impl(register=_collector(new_trainers, Trainer, record.name))
            for impl in _impls(pm, plugin, "qflux_register_quantizers"):
                impl(register=_collector(new_quantizers, Quantizer, record.name))
            for impl in _impls(pm, plugin, "qflux_register_adapters"):
                impl(register=_collector(new_adapters, Adapter, record.name))
        except Exception as err:  # noqa: BLE001 - a bad hook signature, an unknown hook, a raising register
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            broken.append(BrokenPlugin(record.name, record.package, f"{type(err).__name__}: {err}"))
            continue
        record.hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        for kind, new, registered, names in (("trainer", new_trainers, trainers, record.trainers),
                                             ("quantizer", new_quantizers, quantizers, record.quantizers),
                                             ("adapter", new_adapters, adapters, record.adapters)):
            for obj in new:
                _claim(obj.name, kind, record.package, provider, registered)
                registered[obj.name] = obj
                names.append(obj.name)
        if plugin is not default_plugin and plugin is not ema:
            records.append(record)

    return Registry(pm, records, broken, trainers, quantizers, provider, allow, adapters)


def _collector(out: list[Any], cls: type, plugin_name: str) -> Any:
    """The ``register`` callable handed to a registration hook: checks the type, collects the objects."""

    def register(info: Any) -> None:
        if not isinstance(info, cls):
            hint = ""
            if type(info).__name__ in ("TrainerInfo", "QuantizerInfo"):  # the registration of qflux 0.2
                hint = (f" (since qflux 0.3 a plugin registers a {cls.__name__} object that holds its info and "
                        "implements the stages: docs/plugins.md)")
            raise PluginError(f"plugin {plugin_name}: register() takes a {cls.__name__}, got "
                              f"{type(info).__name__}{hint}")
        out.append(info)

    return register


def _check_hook_names(pm: pluggy.PluginManager, plugin: object) -> None:
    """pluggy accepts a hookimpl whose name matches no hookspec (it stays "pending"): reject it, with a hint."""
    import difflib

    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is not None:
            continue
        if all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
            continue
        specs = [n for n in dir(hookspecs) if n.startswith("qflux_")]
        close = difflib.get_close_matches(caller.name, specs, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise PluginError(f"{caller.name} is not a qflux hook{hint}")


def _impls(pm: pluggy.PluginManager, plugin: object, hook_name: str) -> list[Any]:
    caller = getattr(pm.hook, hook_name)
    return [impl.function for impl in caller.get_hookimpls() if impl.plugin is plugin]


def _claim(name: str, kind: str, package: str, provider: dict[str, str], existing: dict[str, Any]) -> None:
    key = f"{kind}:{name}"
    if name in existing:
        raise PluginError(
            f"{kind} name '{name}' is registered by two packages: {provider[key]} and {package}; "
            f"uninstall one or limit loading with {ALLOW_LIST_ENV}"
        )
    provider[key] = package
