"""Shared helpers: fake installed distributions (real entry-point discovery) and running the qflux CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fork_server import run_qflux_process

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_dist(
    root: Path, name: str, version: str, entry_points: dict[str, str], files: dict[str, str] | None = None
) -> Path:
    """Write an installed distribution into ``root`` (to be put on PYTHONPATH): ``NAME-VERSION.dist-info``
    with METADATA and an ``entry_points.txt`` declaring ``[qflux]`` entries, plus module ``files``."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[qflux]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for rel, text in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def fake_dist():
    return make_dist


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PYTHONPATH folder with two installed fake distributions: ``qflux-toy`` 1.0.0 (entry point ``toy``,
    the module tests/fixtures/toy_plugin.py) and ``qflux-broken`` 0.0.1 (``broken``: raises on import)."""
    root = tmp_path_factory.mktemp("plugins")
    make_dist(root, "qflux-toy", "1.0.0", {"toy": "qflux_toy"},
              {"qflux_toy.py": (FIXTURES / "toy_plugin.py").read_text()})
    make_dist(root, "qflux-broken", "0.0.1", {"broken": "qflux_broken"},
              {"qflux_broken.py": "raise RuntimeError('this plugin is broken on purpose')\n"})
    return root


@pytest.fixture(scope="session")
def toy_plugin():
    """tests/fixtures/toy_plugin.py imported as a module (a plugin object for ``build_registry``)."""
    name = "qflux_test_toy_plugin"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FIXTURES / "toy_plugin.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def qflux_env(pythonpath: list[Path] | tuple = (), **env: str | None) -> dict[str, str]:
    """The current environment without qflux settings, plus ``pythonpath`` and ``env`` (None removes)."""
    out = {k: v for k, v in os.environ.items() if k not in ("QFLUX_LOAD_PLUGINS", "PYTHONPATH")}
    out.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    if pythonpath:
        out["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    for k, v in env.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


@pytest.fixture
def run_qflux(tmp_path: Path):
    """Run ``python -m qflux ARGS`` (or the console script) in a subprocess; returns the CompletedProcess.

    ``plugins`` sets QFLUX_LOAD_PLUGINS (None: unset, i.e. load every installed plugin)."""

    def run(*args: str, plugins: str | None = "", pythonpath=(), console_script: bool = False, cwd=None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = qflux_env(pythonpath, QFLUX_LOAD_PLUGINS=plugins, **(env or {}))
        if console_script:  # the installed entry point itself, never forked
            return subprocess.run([str(Path(sys.executable).parent / "qflux"), *map(str, args)], cwd=cwd or tmp_path,
                                  env=full_env, capture_output=True, text=True, timeout=120)
        return run_qflux_process(list(args), cwd or tmp_path, full_env, timeout=120)

    return run
