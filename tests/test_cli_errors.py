"""The CLI contract for user errors (subprocesses): exit code 2, one clear message, no traceback unless
``--debug``; ``python -m qflux`` behaves like the ``qflux`` console script; ``config show`` prints YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qflux.config import load_config


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one ``error:`` message on stderr holding every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


CASES = {
    "unknown-key": ("model:\n  lora:\n    rnk: 8\n", ["unknown key 'model.lora.rnk'", "did you mean 'model.lora.rank'?"]),
    "key-in-wrong-section": ("model:\n  lr: 0.001\n", ["unknown key 'model.lr'", "did you mean 'train.lr'?"]),
    "wrong-type": ("train:\n  max_steps: lots\n", ["'train.max_steps'", "valid integer", "(got 'lots')"]),
    "bad-yaml": ("trainer: toy\nmodel:\n  dtype: [float32\n", ["invalid YAML (line 4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_errors_exit_2_with_one_message(case: str, tmp_path: Path, run_qflux) -> None:
    text, fragments = CASES[case]
    path = write(tmp_path, text)
    err = assert_user_error(run_qflux("config", "check", path), str(path), *fragments)
    assert len(err.splitlines()) <= 2  # the file and the one mistake


def test_debug_shows_the_traceback(tmp_path: Path, run_qflux) -> None:
    path = write(tmp_path, CASES["unknown-key"][0])
    result = run_qflux("--debug", "config", "check", path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr and "model.lora.rnk" in result.stderr


def test_missing_config_file(tmp_path: Path, run_qflux) -> None:
    assert_user_error(run_qflux("config", "check", tmp_path / "nope.yaml"), "config file not found", "nope.yaml")
    assert_user_error(run_qflux("config", "show", "nope.yaml"), "config file not found: nope.yaml")
    debug = run_qflux("--debug", "config", "show", "nope.yaml")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_set_is_a_user_error(tmp_path: Path, run_qflux) -> None:
    path = write(tmp_path, "")
    assert_user_error(run_qflux("config", "show", path, "--set", "train.lr"), "--set 'train.lr'", "KEY=VALUE")
    assert_user_error(run_qflux("config", "show", path, "--set", "model.lora.rnk=4"), "did you mean 'model.lora.rank'?")


def test_unknown_trainer_lists_the_installed_ones(tmp_path: Path, run_qflux, plugin_path: Path) -> None:
    path = write(tmp_path, "trainer: nope\n")
    assert_user_error(run_qflux("config", "check", path, plugins="toy", pythonpath=[plugin_path]),
                      "unknown trainer 'nope' (installed trainers: toy)")
    assert_user_error(run_qflux("config", "check", path, plugins=""), "unknown trainer 'nope' (installed trainers: none)")


def test_known_but_missing_trainer_says_which_package_to_install(tmp_path: Path, run_qflux, plugin_path: Path) -> None:
    path = write(tmp_path, "trainer: qwen-edit\n")
    err = assert_user_error(run_qflux("config", "check", path, plugins="toy", pythonpath=[plugin_path]),
                            "unknown trainer 'qwen-edit' (installed trainers: toy)", "pip install qflux-qwen")
    assert "QFLUX_LOAD_PLUGINS" in err  # it may be installed but kept out by the allow-list
    assert_user_error(run_qflux("config", "check", path, "--trainer", "kontext", plugins=""), "pip install qflux-kontext")


def test_missing_quantizer_says_which_package_to_install(tmp_path: Path, run_qflux, plugin_path: Path) -> None:
    path = write(tmp_path, "trainer: toy\nmodel: {quantize: nf4}\n")
    assert_user_error(run_qflux("config", "check", path, plugins="toy", pythonpath=[plugin_path]),
                      "unknown quantizer 'nf4'", "installed: toy-round", "pip install qflux-quant")


def test_config_check_accepts_a_valid_config(tmp_path: Path, run_qflux, plugin_path: Path) -> None:
    path = write(tmp_path, "trainer: toy\nmodel: {quantize: toy-round}\n")
    result = run_qflux("config", "check", path, plugins="toy", pythonpath=[plugin_path])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (trainer toy)"


def test_config_show_prints_the_resolved_yaml(tmp_path: Path, run_qflux, plugin_path: Path) -> None:
    path = write(tmp_path, "trainer: toy\ntrain:\n  max_steps: 10\n")
    overrides = ["train.lr=2e-4", "model.lora.rank=4", "data.resolution=[512, 768]", "train.mixed_precision=no"]
    args = [a for o in overrides for a in ("--set", o)]
    result = run_qflux("config", "show", path, *args, plugins="toy", pythonpath=[plugin_path])
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown == load_config(path, overrides).model_dump(mode="json")
    assert shown["train"]["max_steps"] == 10 and shown["train"]["lr"] == 2e-4 and shown["model"]["lora"]["rank"] == 4
    assert shown["data"]["resolution"] == [512, 768] and shown["train"]["mixed_precision"] == "no"
    assert shown["output"]["dir"] == "runs/my_run"  # defaults are filled in
    assert list(shown)[:2] == ["trainer", "model"]  # schema order, not sorted
    # the printed YAML is itself a valid config that resolves to the same thing
    again = run_qflux("config", "show", write(tmp_path, result.stdout, "shown.yaml"), plugins="toy",
                      pythonpath=[plugin_path])
    assert again.returncode == 0 and again.stdout == result.stdout


def test_python_m_qflux_works_like_the_console_script(tmp_path: Path, run_qflux, plugin_path: Path) -> None:
    for args in (["plugins", "list", "--json"], ["config", "check", write(tmp_path, "trainer: nope\n")], ["--help"]):
        module = run_qflux(*args, plugins="toy,broken", pythonpath=[plugin_path])
        script = run_qflux(*args, plugins="toy,broken", pythonpath=[plugin_path], console_script=True)
        assert (module.returncode, module.stdout, module.stderr) == (script.returncode, script.stdout, script.stderr)
    listing = json.loads(run_qflux("plugins", "list", "--json", plugins="toy", pythonpath=[plugin_path]).stdout)
    assert listing["trainers"] == ["toy"]
    assert "Usage: qflux" in run_qflux("--help").stdout


def test_usage_errors_exit_2_without_traceback(run_qflux) -> None:
    for args in (["config", "check"], ["config", "nope"], ["plugins", "list", "--jsn"]):
        result = run_qflux(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
