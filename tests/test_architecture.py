"""The core's layer contract (issue 15): `lint-imports` (import-linter, a dev requirement) checks the contracts of
the root pyproject.toml's [tool.importlinter]: cli > run > plugins | importers > training > adapters > data | cache
> config > the rest, imports inside functions included, type-only imports not; and the plugins keep out of the
core's subpackages. benchmarks/architecture.py prints the same layer order's upward imports and cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layer_contract():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.fail(f"{lint_imports} is missing: import-linter is not installed in this venv "
                    "(it is in requirements-dev.txt; run the Makefile's install step)")
    result = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports exited {result.returncode}:\n{output}"
    assert " 0 broken" in output, output
