"""Safety (docs/errors.md, "Safety"): nothing qflux reads can run code, and the Hugging Face token is never
written anywhere.

- the source tree never unpickles: no ``pickle.load``, every ``torch.load`` has ``weights_only=True``, no
  ``trust_remote_code``, no ``allow_pickle=True``, YAML only through safe loaders, model weights only from
  safetensors (``use_safetensors=True``);
- planted pickles (a LoRA, a checkpoint's training state, a cache entry) are refused, never executed;
- a short training run with ``HF_TOKEN`` set writes the token to no output, log, metrics, config or TensorBoard
  file, and neither does a failing run that tries the hub;
- ``QFLUX_LOAD_PLUGINS`` keeps plugins out of the process (not even imported) and is documented.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from qflux.testing import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in (REPO / "packages").glob("*/src/**/*.py"))
PACKAGES = sorted({p.relative_to(REPO / "packages").parts[0] for p in SOURCES})
SENTINEL_TOKEN = "hf_secret_sentinel"

# from_pretrained receivers that load no weights (tokenizers, processors, schedulers, configs)
_NO_WEIGHTS = ("Tokenizer", "Processor", "Scheduler", "Config", "FeatureExtractor")
# qflux-qwen's loaders are owned elsewhere; the gap is reported in docs/errors.md until they pass the flag
_KNOWN_GAPS: dict[str, str] = {}  # package -> reason, for a gap being fixed (the test then xfails)
# (file, line text) -> why a call the scan flags is safe. qflux.modeling.guarded_load loads any class: a torch
# module always gets use_safetensors=True (test_guarded_load_reads_weights_only_from_safetensors); the flagged
# call is its branch for classes that are not modules (tokenizers, schedulers, processors: no weights).
_ALLOWED = {("packages/qflux-core/src/qflux/modeling.py",
             "return cls.from_pretrained(source, subfolder=component, **kwargs)"): "guarded_load, no weights"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function (``torch.load``, ``yaml.load``, ``X.from_pretrained``)."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(path: Path) -> list[str]:
    """``file:line: why`` for every unsafe deserialisation in one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")
                   for n in names):
                found.append(f"{rel}:{node.lineno}: imports a pickle-like module")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        where = f"{rel}:{node.lineno}: {name}"
        if name.endswith(("pickle.load", "pickle.loads", "pickle.Unpickler")):
            found.append(f"{where} unpickles")
        if name in ("torch.load",) and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where} without weights_only=True")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(f"{where}: not a safe YAML loader")
        if name == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _name(loader).split(".")[-1] in ("Loader", "FullLoader", "UnsafeLoader"):
                found.append(f"{where} without a safe Loader")
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code" and not (isinstance(keyword.value, ast.Constant)
                                                            and keyword.value.value is False):
                found.append(f"{where} passes trust_remote_code")
            if keyword.arg == "allow_pickle" and _is_true(keyword.value):
                found.append(f"{where} passes allow_pickle=True")
        if name.endswith(".from_pretrained") and not any(w in name for w in _NO_WEIGHTS):
            if not _is_true(_kw(node, "use_safetensors")):
                found.append(f"{where} without use_safetensors=True (weights could be read from a pickle)")
    return found


def _allowed(finding: str) -> bool:
    file, line = finding.split(":")[:2]
    text = (REPO / file).read_text(encoding="utf-8").splitlines()[int(line) - 1].strip()
    return (file, text) in _ALLOWED


def test_guarded_load_reads_weights_only_from_safetensors() -> None:
    """The allowed call above is safe: a module class always gets use_safetensors=True (even if a caller passes
    False), a class that is not a module gets what the caller passed."""
    import torch

    from qflux.modeling import guarded_load

    seen = []

    class Model(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            seen.append(kwargs)

    class Tokenizer:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            seen.append(kwargs)

    guarded_load(Model, "x", "transformer", use_safetensors=False)
    guarded_load(Model, "x", "vae")
    guarded_load(Tokenizer, "x", "tokenizer", revision="r")
    assert seen == [{"subfolder": "transformer", "use_safetensors": True}, {"subfolder": "vae", "use_safetensors": True},
                    {"subfolder": "tokenizer", "revision": "r"}]


def test_the_checker_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch, yaml\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
                   "yaml.load('a')\nM.from_pretrained('p', trust_remote_code=True)\nnp.load('a', allow_pickle=True)\n"
                   "CLIPTokenizer.from_pretrained('p')\nT5EncoderModel.from_pretrained('p', use_safetensors=True)\n")
    found = unsafe_calls(bad)
    assert len(found) == 7, found
    assert sum("from_pretrained" in f for f in found) == 2  # the tokenizer and the flagged encoder are fine


@pytest.mark.parametrize("package", PACKAGES)
def test_source_never_unpickles_or_trusts_remote_code(package: str) -> None:
    assert SOURCES, "no sources found"
    found = [f for p in SOURCES if p.relative_to(REPO / "packages").parts[0] == package for f in unsafe_calls(p)
             if not _allowed(f)]
    if package in _KNOWN_GAPS and found:
        pytest.xfail(_KNOWN_GAPS[package])
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- planted pickles


class _Plant:
    """Unpickling this creates the folder ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_pickled_lora_is_refused_not_executed(tmp_path: Path) -> None:
    from qflux.adapters.lora_files import lora_file_shapes
    from qflux.errors import UserError

    executed = tmp_path / "executed"
    for name in ("lora.safetensors", "lora.bin", "lora.ckpt"):
        (tmp_path / name).write_bytes(pickle.dumps({"w": _Plant(executed)}))
        with pytest.raises(UserError, match="safetensors"):
            lora_file_shapes(tmp_path / name)
    assert not executed.exists()


def test_pickled_checkpoint_state_is_refused_not_executed(tmp_path: Path) -> None:
    """A checkpoint whose training_state.pt carries an object (manifest made to match) is refused by
    torch.load(weights_only=True) with a UserError, and the object is never built."""
    import torch
    from safetensors.torch import save

    from qflux.errors import UserError
    from qflux.training import checkpoint as ckpt

    executed = tmp_path / "executed"
    folder = ckpt.checkpoint_dir(tmp_path / "run", 1)
    folder.mkdir(parents=True)
    payloads = {ckpt.LORA: save({"a": torch.zeros(1)}), ckpt.STATE: b'{"step": 1}'}
    state = tmp_path / "state.pt"
    torch.save({"optimizer": _Plant(executed), "lr_scheduler": {}}, state)
    payloads[ckpt.TRAINING] = state.read_bytes()
    manifest = {}
    for name, data in payloads.items():
        (folder / name).write_bytes(data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(folder) is None
    with pytest.raises(UserError, match="cannot read training_state.pt"):
        ckpt.load_checkpoint(folder)
    assert not executed.exists()


def test_pickled_cache_entry_is_refused_not_executed(tmp_path: Path) -> None:
    """A cache entry replaced by a pickle whose index stamp matches is reported and dropped, never executed."""
    from qflux.cache.store import EmbeddingCache, EntryStamp

    executed = tmp_path / "executed"
    cache = EmbeddingCache(tmp_path / "cache")
    cache.root.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps(_Plant(executed))
    key = "ab" * 20
    cache.path_of(key).parent.mkdir(parents=True)
    cache.path_of(key).write_bytes(data)
    cache._append_index(key, EntryStamp(len(data), hashlib.sha256(data).hexdigest()))
    warnings: list[str] = []
    reopened = EmbeddingCache(cache.root, warn=warnings.append)
    assert reopened.get(key) is None
    assert warnings and "undecodable" in warnings[0]
    assert not executed.exists()


def test_yaml_tags_cannot_run_code(tmp_path: Path) -> None:
    from qflux.config import load_config
    from qflux.errors import ConfigError

    executed = tmp_path / "executed"
    path = tmp_path / "c.yaml"
    path.write_text(f"trainer: !!python/object/apply:os.mkdir ['{executed}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    assert not executed.exists()


# --------------------------------------------------------------------------- the Hugging Face token


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QFLUX_LOAD_PLUGINS", "PYTHONPATH")}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", QFLUX_LOAD_PLUGINS="kontext", HF_TOKEN=SENTINEL_TOKEN,
               HUGGING_FACE_HUB_TOKEN=SENTINEL_TOKEN)
    env.update(extra)
    return env


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_hf_token_is_never_printed_or_written(tmp_path: Path) -> None:
    """A short training run (validation samples and held-out loss on, so every writer runs) with the token in
    the environment: the token is in no output, log, metrics, config.yaml, TensorBoard or cache file."""
    config = tiny_config(tmp_path, data={"num_samples": 4, "holdout": 1},
                         train={"max_steps": 2, "save_every": 1, "batch_size": 1},
                         validation={"every": 2, "steps": 1, "from_holdout": 1})
    path = write_config(tmp_path / "c.yaml", config)
    runs = [subprocess.run([sys.executable, "-m", "qflux", *args], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
            for args in (["train", "--config", str(path)], ["config", "show", str(path)],
                         ["plugins", "list", "--json"])]
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "pytorch_lora_weights.safetensors", "samples/step-000002.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    for result in runs:
        assert SENTINEL_TOKEN not in result.stdout + result.stderr
    assert _files_holding(tmp_path, SENTINEL_TOKEN.encode()) == []


def test_hf_token_is_not_shown_when_the_hub_fails(tmp_path: Path) -> None:
    """A hub model id while offline fails with a user error (exit 2) that does not show the token, with and
    without --debug, and leaves no run folder."""
    config = tiny_config(tmp_path, model={"pretrained": "black-forest-labs/FLUX.1-Kontext-dev", "dtype": "float32"},
                         data={"num_samples": 2, "holdout": 0})
    path = write_config(tmp_path / "c.yaml", config)
    for debug in ([], ["--debug"]):
        result = subprocess.run([sys.executable, "-m", "qflux", *debug, "train", "--config", str(path)],
                                cwd=tmp_path, env=_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                                timeout=300)
        both = result.stdout + result.stderr
        assert result.returncode != 0 and "black-forest-labs/FLUX.1-Kontext-dev" in both, both[-2000:]
        assert SENTINEL_TOKEN not in both
        if not debug:
            assert result.returncode == 2 and "Traceback" not in both
    assert not (tmp_path / "run").exists()
    assert _files_holding(tmp_path, SENTINEL_TOKEN.encode()) == []


def test_a_token_in_the_config_is_refused_and_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  hf_token: {SENTINEL_TOKEN}\n  max_sequence_length: {SENTINEL_TOKEN}\n")
    result = subprocess.run([sys.executable, "-m", "qflux", "config", "check", str(path)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "set the HF_TOKEN environment variable" in result.stderr
    assert "looks like a Hugging Face token: not shown" in result.stderr
    assert SENTINEL_TOKEN not in result.stdout + result.stderr


# --------------------------------------------------------------------------- the plugin allow-list


def test_allow_list_keeps_other_plugins_out_of_the_process() -> None:
    code = ("import sys; from qflux.plugins import build_registry; r = build_registry(); "
            "print(sorted(r.trainers), sorted(r.quantizers), 'qflux_quant' in sys.modules, 'qflux_qwen' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(QFLUX_LOAD_PLUGINS="kontext"), capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "['kontext'] [] False False", out.stderr


def test_safety_section_documents_the_allow_list() -> None:
    text = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    section = text[text.index("## Safety"):]
    for needle in ("QFLUX_LOAD_PLUGINS", "plugins.md#qflux_load_plugins-loading-only-some-plugins", "weights_only=True",
                   "safetensors", "trust_remote_code", "HF_TOKEN"):
        assert needle in section, needle
    assert (REPO / "docs" / "plugins.md").read_text(encoding="utf-8").count("## `QFLUX_LOAD_PLUGINS`") == 1
