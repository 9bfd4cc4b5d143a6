"""The declared dependency floors of the qflux packages, as pip constraints (``make test-floor``).

Reads ``packages/*/pyproject.toml`` (the source of the packages' metadata) and prints one ``name==version`` line
per third-party requirement: the highest ``>=`` floor any of the packages declares for it, since the packages
are installed into one environment. ``--override name==version`` replaces a floor that cannot be installed here
(torch: only 2.13.0 (CPU) and 2.14.1 lie on this machine's disk; PyPI's older torch is a multi-GB CUDA build, and
torchvision must match torch).

    python tests/floor_constraints.py [--override torch==2.14.1 ...] [PACKAGE ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("qflux-core", "qflux-kontext", "qflux-qwen", "qflux-quant")
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floor_of(specifier: str) -> str | None:
    """The version after ``>=`` in a specifier such as ``>=0.37,<1`` (None: no floor)."""
    for part in specifier.split(","):
        part = part.strip()
        if part.startswith(">="):
            return part[2:].strip()
    return None


def requirements(package: str) -> list[tuple[str, str]]:
    """(canonical name, specifier) of each dependency of ``package`` (its ``[project] dependencies``)."""
    project = tomllib.loads((REPO / "packages" / package / "pyproject.toml").read_text())["project"]
    out = []
    for line in project.get("dependencies", []):
        match = _REQ.match(line)
        if match is None:
            raise ValueError(f"{package}: cannot parse requirement {line!r}")
        out.append((canonical(match[1]), match[3]))
    return out


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def floors(packages: tuple[str, ...] | list[str] = PACKAGES) -> dict[str, str]:
    """Third-party requirement -> the highest floor the ``packages`` declare (qflux's own packages left out)."""
    out: dict[str, str] = {}
    for package in packages:
        for name, spec in requirements(package):
            version = floor_of(spec)
            if name.startswith("qflux-") or version is None:
                continue
            if name not in out or version_key(version) > version_key(out[name]):
                out[name] = version
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES))
    parser.add_argument("--override", action="append", default=[], metavar="NAME==VERSION")
    args = parser.parse_args(argv)
    pins = floors(args.packages)
    for item in args.override:
        name, _, version = item.partition("==")
        pins[canonical(name)] = version
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
