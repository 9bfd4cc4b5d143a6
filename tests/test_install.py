"""Installability (issue 2, item 7): build the four packages as wheels and install them, one after the
other, into a fresh venv; after each step the CLI shows exactly what the installed packages provide.

The fresh venv must not see the editable qflux installs of the development venv, but it reuses that venv's
heavy dependencies (torch, diffusers, ...) without a download: a folder of symlinks to every entry of the
development site-packages except the qflux ones is added to the fresh venv's path by a ``.pth`` file.
Wheels are built offline (``--no-build-isolation --no-index``) from copies of the package folders, so the
checkout is left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qflux.plugins import KNOWN_QUANTIZERS, KNOWN_TRAINERS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
STAGES = ["qflux-core", "qflux-kontext", "qflux-qwen", "qflux-quant"]
PYPROJECT = {name: tomllib.loads((REPO / "packages" / name / "pyproject.toml").read_text()) for name in STAGES}

# Run inside the fresh venv: each qflux entry point and the hooks its object really implements.
INTROSPECT = r"""
import importlib.metadata, json
out = {}
for ep in importlib.metadata.entry_points(group="qflux"):
    try:
        obj = ep.load()
    except Exception as err:
        out[ep.name] = {"dist": ep.dist.metadata["Name"], "error": f"{type(err).__name__}: {err}"}
        continue
    hooks = set()
    for attr in dir(obj):
        opts = getattr(getattr(obj, attr, None), "qflux_impl", None)
        if isinstance(opts, dict):
            hooks.add(opts.get("specname") or attr)
    out[ep.name] = {"dist": ep.dist.metadata["Name"], "hooks": sorted(hooks)}
print(json.dumps(out))
"""


def provided(package: str) -> tuple[set[str], set[str]]:
    """The trainer and quantizer names qflux documents for ``package``."""
    return ({n for n, p in KNOWN_TRAINERS.items() if p == package}, {n for n, p in KNOWN_QUANTIZERS.items() if p == package})


def is_qflux_entry(name: str) -> bool:
    n = name.lower()
    return n.startswith(("qflux", "__editable__", "_qflux")) or n.endswith(".pth")


@dataclass
class FreshVenv:
    root: Path
    wheels: dict[str, Path | str]  # package -> wheel, or the build error
    tmp: Path
    installed: list[str] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QFLUX_LOAD_PLUGINS", "VIRTUAL_ENV")}
        env.update(PYTHONNOUSERSITE="1", COLUMNS="200", NO_COLOR="1", VIRTUAL_ENV=str(self.root))
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=self.tmp, env=self.env(), capture_output=True, text=True,
                              timeout=120)

    def qflux(self, *args: str | Path) -> subprocess.CompletedProcess:
        return self.run(self.root / "bin" / "qflux", *args)

    def install_upto(self, package: str) -> None:
        """Install the wheels of the stages up to ``package`` that are not installed yet, in order."""
        for name in STAGES[: STAGES.index(package) + 1]:
            if name in self.installed:
                continue
            wheel = self.wheels[name]
            assert isinstance(wheel, Path), f"building the {name} wheel failed:\n{wheel}"
            result = self.run(self.python, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--disable-pip-version-check", wheel)
            assert result.returncode == 0, f"pip install {wheel.name} failed:\n{result.stderr}"
            self.installed.append(name)

    def listing(self) -> dict:
        result = self.qflux("plugins", "list", "--json")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return json.loads(result.stdout)

    def check(self, config: str) -> subprocess.CompletedProcess:
        path = self.tmp / "config.yaml"
        path.write_text(config)
        return self.qflux("config", "check", path)


def build_wheels(tmp: Path) -> dict[str, Path | str]:
    """Build the four wheels concurrently from copies of the package folders; package -> wheel or error."""
    try:
        import setuptools  # noqa: F401 - needed by --no-build-isolation
    except ModuleNotFoundError:
        pytest.fail("setuptools is not installed in this venv: building the wheels offline needs it "
                    "(it is in requirements-dev.txt; run the Makefile's install step)")
    out = tmp / "wheels"
    procs = {}
    for name in STAGES:
        src = tmp / "src" / name
        shutil.copytree(REPO / "packages" / name, src,
                        ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__", "tests", ".*"))
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "--disable-pip-version-check", "-w", str(out / name), str(src)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
        )
    wheels: dict[str, Path | str] = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=180)
        found = sorted((out / name).glob(f"{name.replace('-', '_')}-*.whl"))
        wheels[name] = found[0] if proc.returncode == 0 and found else (log or f"exit code {proc.returncode}")
    return wheels


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    tmp = tmp_path_factory.mktemp("install")
    wheels = build_wheels(tmp)

    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    # The development venv's dependencies, minus every qflux distribution and editable-install hook.
    deps = tmp / "deps"
    deps.mkdir()
    dev_site = Path(sysconfig.get_paths()["purelib"])
    for entry in dev_site.iterdir():
        if not is_qflux_entry(entry.name):
            (deps / entry.name).symlink_to(entry)
    site = Path(subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "qflux-test-deps.pth").write_text(f"{deps}\n")
    fresh = FreshVenv(root=root, wheels=wheels, tmp=tmp)

    leak = fresh.run(fresh.python, "-c", "import importlib.util as u; print(u.find_spec('qflux'), u.find_spec('torch') is not None)")
    assert leak.returncode == 0 and leak.stdout.split() == ["None", "True"], (
        f"the fresh venv must see torch but no qflux before installing: {leak.stdout} {leak.stderr}")
    return fresh


def assert_package_stage(venv: FreshVenv, package: str) -> None:
    """``package`` was just installed: its plugins are listed with package, version, kind, names and hooks."""
    project = PYPROJECT[package]["project"]
    entry_points = project.get("entry-points", {}).get("qflux", {})
    assert entry_points, f"{package} declares no [project.entry-points.qflux]"
    trainers, quantizers = provided(package)

    listing = venv.listing()
    broken = [b for b in listing["broken"] if b["package"] == package]
    assert not broken, f"{package}'s plugin failed to load in a fresh install: {broken}"
    introspected = json.loads(venv.run(venv.python, "-c", INTROSPECT).stdout)
    records = {p["name"]: p for p in listing["plugins"] if p["package"] == package}
    assert set(records) == set(entry_points), f"{package}: listed plugins {sorted(records)}, entry points {sorted(entry_points)}"
    for ep_name, record in records.items():
        assert record["version"] == project["version"]
        assert record["hooks"] == introspected[ep_name]["hooks"], (
            f"{package}: listed hooks {record['hooks']} differ from what {entry_points[ep_name]} implements "
            f"{introspected[ep_name]['hooks']}")
        assert record["hooks"], f"{package}: plugin {ep_name} implements no hook"
    listed_trainers = {t for r in records.values() for t in r["trainers"]}
    listed_quantizers = {q for r in records.values() for q in r["quantizers"]}
    assert trainers <= listed_trainers, f"{package} should provide the trainers {sorted(trainers)}"
    assert quantizers <= listed_quantizers, f"{package} should provide the quantizers {sorted(quantizers)}"
    assert set(listing["trainers"]) >= listed_trainers and set(listing["quantizers"]) >= listed_quantizers
    kinds = {r["kind"] for r in records.values()}
    assert kinds == ({"trainer"} if trainers else {"quantizer"})


def test_stage_1_core_alone(venv: FreshVenv) -> None:
    venv.install_upto("qflux-core")
    located = venv.run(venv.python, "-c", "import qflux; print(qflux.__file__)")
    assert located.stdout.startswith(str(venv.root)), f"qflux imported from {located.stdout}: the checkout leaked in"
    assert venv.listing() == {"plugins": [], "broken": [], "trainers": [], "quantizers": [],
                              "adapters": ["loha", "lokr", "lora"], "aliases": {}}
    result = venv.check("trainer: kontext\n")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "unknown trainer 'kontext' (installed trainers: none)" in result.stderr
    assert "pip install qflux-kontext" in result.stderr
    assert venv.run(venv.python, "-m", "qflux", "--help").returncode == 0


def test_stage_2_kontext_adds_its_trainer(venv: FreshVenv) -> None:
    venv.install_upto("qflux-core")
    before = venv.check("trainer: kontext\n")
    venv.install_upto("qflux-kontext")
    assert_package_stage(venv, "qflux-kontext")
    assert "pip install qflux-kontext" in before.stderr
    result = venv.check("trainer: kontext\n")
    assert result.returncode == 0, result.stderr
    missing = venv.check("trainer: qwen-edit\n")
    assert missing.returncode == 2 and "pip install qflux-qwen" in missing.stderr
    assert "installed trainers: kontext" in missing.stderr


def test_stage_3_qwen_adds_its_trainers(venv: FreshVenv) -> None:
    venv.install_upto("qflux-qwen")
    assert_package_stage(venv, "qflux-qwen")
    for trainer in sorted(provided("qflux-qwen")[0]):
        result = venv.check(f"trainer: {trainer}\n")
        assert result.returncode == 0, result.stderr
    missing = venv.check("trainer: qwen-edit\nmodel: {quantize: nf4}\n")
    assert missing.returncode == 2 and "pip install qflux-quant" in missing.stderr


def test_stage_4_quant_adds_its_quantizers(venv: FreshVenv) -> None:
    venv.install_upto("qflux-quant")
    assert_package_stage(venv, "qflux-quant")
    for method in sorted(provided("qflux-quant")[1]):
        result = venv.check(f"trainer: qwen-edit\nmodel: {{quantize: {method}}}\n")
        assert result.returncode == 0, result.stderr
    listing = venv.listing()
    assert listing["broken"] == []
    assert {p["package"] for p in listing["plugins"]} == set(STAGES[1:])
