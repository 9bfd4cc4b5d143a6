"""One path rule (issue 14 item 5): ``~`` is the home folder in every path-valued config key and CLI option.

Before it, ``output.dir``, ``cache.dir``, ``validation.samples[].control`` / ``target`` and ``qflux sample
--lora/--image/--out`` kept a literal ``~``: a ``./~/`` folder appeared in the current folder (inviting
``rm -rf ~``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from PIL import Image
from pydantic import BaseModel

from qflux.config import QfluxConfig, load_config
from qflux.config.schema import EXPAND_USER
from qflux.testing import tiny_config, write_config

# A field whose name says it holds a path; ``control_resolution`` and the like are numbers, not paths.
PATH_NAME = re.compile(r"(^|_)(path|paths|dir|dirs|folder|file|files|control|controls|target|targets|pretrained|"
                       r"mask|masks|manifest)$")
NOT_PATHS = {"model.lora.targets"}  # module names of the transformer, not files


def _uses_path_type(annotation: object, metadata: list[object]) -> bool:
    """Whether the annotation is the path type, or a container / optional of it."""
    if EXPAND_USER in metadata:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return EXPAND_USER in annotation.__metadata__
    args = typing.get_args(annotation)
    return bool(args) and all(_uses_path_type(a, []) for a in args if a is not type(None))


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        yield key, name, field
        for sub in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _fields(sub, key)


def _holds_text(annotation: object) -> bool:
    return annotation is str or any(_holds_text(a) for a in typing.get_args(annotation))


def test_every_path_key_uses_the_path_type() -> None:
    keys = [(key, field) for key, name, field in _fields(QfluxConfig)
            if PATH_NAME.search(name) and key not in NOT_PATHS and _holds_text(field.annotation)]
    assert {"data.path", "model.pretrained", "output.dir", "cache.dir"} <= {k for k, _ in keys}
    wrong = [key for key, field in keys if not _uses_path_type(field.annotation, field.metadata)]
    assert not wrong, f"declare these keys with qflux.config.schema.PathStr: {wrong}"


def test_tilde_is_expanded_in_every_path_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, ["output.dir=~/runs/a", "cache.dir=~/cache", "data.path=~/ds",
                                "model.pretrained=~/models/k",
                                "validation.samples=[{prompt: p, control: [~/c.png], target: ~/t.png}]"])
    assert config.output.dir == f"{tmp_path}/runs/a" and config.cache.dir == f"{tmp_path}/cache"
    assert config.data.path == f"{tmp_path}/ds" and config.model.pretrained == f"{tmp_path}/models/k"
    assert config.validation.samples[0].control == [f"{tmp_path}/c.png"]
    assert config.validation.samples[0].target == f"{tmp_path}/t.png"
    untouched = load_config(None, ["data.path=hf:owner/name", "model.pretrained=owner/name"])
    assert untouched.data.path == "hf:owner/name" and untouched.model.pretrained == "owner/name"


def _qflux(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOME=str(home), QFLUX_LOAD_PLUGINS="kontext", NO_COLOR="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "qflux", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_and_sample_write_under_home_never_into_a_tilde_folder(tmp_path: Path) -> None:
    """A real ``qflux train`` and ``qflux sample`` with every path under ``~``: nothing named ``~`` appears."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(home / "ctrl.png")
    config = tiny_config(tmp_path, "kontext", train={"max_steps": 1, "batch_size": 1, "save_every": 0},
                         data={"path": "builtin:shapes", "resolution": 32, "num_samples": 2, "holdout": 0},
                         validation={"every": 1, "steps": 1, "samples": [{"prompt": "red", "control": ["~/ctrl.png"]}]})
    config["output"] = {"dir": "~/runs/t"}
    config["cache"] = {"dir": "~/cache"}
    write_config(work / "c.yaml", config)
    trained = _qflux(["train", "c.yaml"], work, home)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert not list(work.rglob("~*")), sorted(map(str, work.rglob("*")))
    lora = home / "runs" / "t" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (home / "cache" / "index.jsonl").is_file()
    sampled = _qflux(["sample", "-c", "c.yaml", "--lora", "~/runs/t/pytorch_lora_weights.safetensors",
                      "--image", "~/ctrl.png", "--prompt", "red", "--out", "~/out.png", "--steps", "1"], work, home)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (home / "out.png").is_file() and not list(work.rglob("~*"))
