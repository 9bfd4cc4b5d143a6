"""Honest dependency floors (issue 13 section 7): what each installed qflux package declares (its metadata,
read with importlib.metadata) is at least the version whose APIs it uses, every third-party module its code
imports is declared, and ``qflux_qwen.loading`` refuses a diffusers without ``zero_cond_t``.

``make test-floor`` installs exactly these floors (tests/floor_constraints.py) in a second venv and runs the
trainer tests there; this file checks the declarations in the development venv.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

import floor_constraints
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# package -> requirement -> (lowest acceptable floor, why): the API that sets it
FLOORS: dict[str, dict[str, tuple[str, str]]] = {
    "qflux-core": {
        "torch": ("2.6", "torch.accelerator.is_available (training loop); torch.distributed.fsdp.fully_shard"),
        "diffusers": ("0.35", "save_lora_weights(transformer_lora_adapter_metadata=...): the LoRA's alpha"),
        "peft": ("0.18", "0.17 imports transformers.HybridCache, removed in transformers 5"),
        "accelerate": ("1.0", "Accelerator(cpu=...), AcceleratorState._reset_state, gather_object"),
        "safetensors": ("0.4.3", "accelerate 1.0 needs it"),
        "typer": ("0.16", "`Path | None` options; click >= 8.2"),
        "numpy": ("2.0", "the pyarrow datasets installs refuses NumPy 1.x"),
        "matplotlib": ("3.9", "built against NumPy 2"),
        "pillow": ("10.1", "ImageFont.load_default(size=...) in the validation grids"),
        "datasets": ("4.0", "datasets.List (hf data sources)"),
    },
    "qflux-kontext": {
        "diffusers": ("0.35", "FluxKontextPipeline (first in 0.35.0)"),
        "transformers": ("5.0", "tokenizers-backed CLIPTokenizer / T5TokenizerFast built from a vocab"),
        "tokenizers": ("0.22.1", "0.22.0 requires huggingface-hub < 1, transformers 5 >= 1.3"),
        "huggingface-hub": ("1.3", "hf_hub_download (loading.py); transformers 5 needs >= 1.3"),
    },
    "qflux-flux2": {
        "diffusers": ("0.42", "Flux2Pipeline (0.36), Flux2KleinPipeline (0.37); the forward and helpers as read in 0.42, "
                              "the one release it is tested on"),
        "transformers": ("5.4", "Qwen2TokenizerFast / PreTrainedTokenizerFast built from vocab + merges, Mistral3, "
                                "PixtralProcessor, Qwen3ForCausalLM"),
        "tokenizers": ("0.22.1", "0.22.0 requires huggingface-hub < 1, transformers 5 >= 1.3"),
        "huggingface-hub": ("1.5", "hf_hub_download (loading.py); transformers 5.4 needs >= 1.5"),
        "torch": ("2.6", "as qflux-core"),
    },
    "qflux-qwen": {
        "diffusers": ("0.38", "QwenImageEditPlusPipeline (0.36); zero_cond_t and mask-derived text length (0.37); "
                              "prompt encoding without an image (0.38)"),
        "transformers": ("5.4", "tokenizers-backed Qwen2Tokenizer from vocab + merges; rope_parameters; the same "
                                "(torchvision) Qwen2VLImageProcessor built in code and loaded from a folder"),
        "torchvision": ("0.21", "transformers 5's Qwen2VLImageProcessor / Qwen2VLVideoProcessor"),
        "tokenizers": ("0.22.1", "0.22.0 requires huggingface-hub < 1, transformers 5 >= 1.3"),
        "torch": ("2.6", "as qflux-core"),
        "huggingface-hub": ("1.5", "hf_hub_download (loading.py); transformers 5.4 needs >= 1.5"),
    },
}
SOURCES = {"qflux-core": "qflux", "qflux-kontext": "qflux_kontext", "qflux-qwen": "qflux_qwen", "qflux-quant": "qflux_quant",
           "qflux-flux2": "qflux_flux2"}


# Imported without being declared, on purpose: installed with (and pinned exactly by) a declared distribution.
COMES_WITH = {"pydantic-core": "pydantic"}


def declared(package: str, extras: bool = False) -> dict[str, Requirement]:
    """The installed ``package``'s requirements (with ``extras``: also its optional ones), by canonical name;
    the test is skipped where ``package`` is not installed (``make test-floor`` leaves qflux-quant out)."""
    try:
        lines = md.requires(package) or []
    except md.PackageNotFoundError:
        pytest.skip(f"{package} is not installed in this venv")
    out = {}
    for line in lines:
        req = Requirement(line)
        if extras or req.marker is None or "extra" not in str(req.marker):
            out[floor_constraints.canonical(req.name)] = req
    return out


def floor(req: Requirement) -> Version | None:
    found = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(found) if found else None


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_metadata_declares_the_api_floors(package):
    reqs = declared(package)
    for name, (minimum, why) in FLOORS[package].items():
        assert name in reqs, f"{package} does not declare {name} (needed for {why})"
        got = floor(reqs[name])
        assert got is not None and got >= Version(minimum), (
            f"{package} declares {reqs[name]}, but needs {name} >= {minimum}: {why}")


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_installed_metadata_matches_pyproject(package):
    """The development venv's metadata is the checkout's (else `make install`): the floors run by
    `make test-floor` (read from pyproject.toml) are the ones tested here."""
    from_metadata = {name: str(req.specifier) for name, req in declared(package).items()}
    from_pyproject = dict(floor_constraints.requirements(package))
    assert {n: floor_constraints.floor_of(s) for n, s in from_metadata.items()} == {
        n: floor_constraints.floor_of(s.replace(" ", "")) for n, s in from_pyproject.items()
    }, f"{package}: installed metadata differs from packages/{package}/pyproject.toml; run `make install`"


def imported_modules(root: Path) -> set[str]:
    """Top-level names of the absolute imports in the ``.py`` files under ``root``."""
    names = set()
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_every_imported_distribution_is_declared(package):
    """A module the package's code imports comes from a distribution it declares (a plugin may rely on what
    qflux-core declares, since it requires qflux-core)."""
    distributions = md.packages_distributions()
    own = declared(package, extras=True)  # an optional import (bitsandbytes' 8-bit AdamW) needs its extra
    inherited = declared("qflux-core") if package != "qflux-core" else {}
    src = REPO / "packages" / package / "src" / SOURCES[package]
    missing = []
    for module in sorted(imported_modules(src)):
        if module in sys.stdlib_module_names or module.startswith("qflux") or module == "__future__":
            continue
        dists = {floor_constraints.canonical(d) for d in distributions.get(module, [module])}
        dists |= {COMES_WITH[d] for d in dists if d in COMES_WITH}
        if not dists & (own.keys() | inherited.keys()):
            missing.append(f"{module} (from {', '.join(sorted(dists))})")
    assert not missing, f"{package} imports undeclared distributions: {missing}"


def test_floor_constraints_pin_the_highest_floor_of_each_requirement():
    floor_venv = ("qflux-core", "qflux-kontext", "qflux-qwen")  # what `make test-floor` installs
    pins = floor_constraints.floors(floor_venv)
    assert pins["diffusers"] == "0.38"  # qflux-qwen's, above core's and kontext's 0.35
    assert "qflux-core" not in pins
    for package, table in FLOORS.items():
        if package not in floor_venv:  # qflux-quant, and qflux-flux2 (its floors are the dev pins)
            continue
        for name, (minimum, _) in table.items():
            assert Version(pins[name]) >= Version(minimum), (package, name)


# --------------------------------------------------------------------------- the runtime guard (diffusers < 0.37)


class _TransformerWithoutZeroCondT:
    """Stands for diffusers 0.36's QwenImageTransformer2DModel: same constructor minus zero_cond_t."""

    def __init__(self, patch_size: int = 2, in_channels: int = 64, out_channels: int | None = 16,
                 num_layers: int = 60, attention_head_dim: int = 128, num_attention_heads: int = 24,
                 joint_attention_dim: int = 3584, guidance_embeds: bool = False,
                 axes_dims_rope: tuple[int, int, int] = (16, 56, 56)):
        pass


def test_guard_passes_on_the_installed_diffusers():
    from qflux_qwen.loading import check_diffusers

    check_diffusers()


@pytest.mark.parametrize("loader", ["load_transformer", "load_encoders"])
def test_guard_refuses_a_diffusers_without_zero_cond_t(loader, monkeypatch):
    import diffusers

    from qflux.config.schema import ModelConfig
    from qflux.errors import UserError
    from qflux_qwen import loading
    from qflux_qwen.variants import VARIANTS

    monkeypatch.setattr(diffusers, "QwenImageTransformer2DModel", _TransformerWithoutZeroCondT)
    monkeypatch.setattr(diffusers, "__version__", "0.36.0")
    with pytest.raises(UserError, match=r"diffusers >= 0\.38 \(.*zero_cond_t.*0\.36\.0"):
        getattr(loading, loader)(VARIANTS["qwen-edit-2511"], ModelConfig(pretrained="builtin:tiny", dtype="float32"))


def test_guard_refuses_diffusers_0_37(monkeypatch):
    """0.37 has zero_cond_t but its plus pipeline fails on a sample without control (KeyError 'pixel_values')."""
    import diffusers

    from qflux.errors import UserError
    from qflux_qwen.loading import check_diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.37.1")
    with pytest.raises(UserError, match=r"diffusers >= 0\.38 \(.*without an image.*0\.37\.1"):
        check_diffusers()
    monkeypatch.setattr(diffusers, "__version__", "0.38.0.dev0")  # a development build of 0.38 is new enough
    check_diffusers()
