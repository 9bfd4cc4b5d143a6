"""Config loading: YAML, defaults, ``--set`` overrides, and errors that name the key, the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qflux.config import QfluxConfig, load_config, parse_overrides
from qflux.errors import ConfigError, UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None = None, overrides: list[str] = (), trainer: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), trainer)
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    return str(info.value)


# --------------------------------------------------------------------------- loading and defaults


def test_defaults_follow_the_design() -> None:
    c = load_config(None)
    assert c == QfluxConfig()
    assert c.trainer == "kontext"
    assert (c.model.pretrained, c.model.dtype, c.model.quantize, c.model.gradient_checkpointing) == (
        "builtin:tiny", "bfloat16", None, False)
    assert (c.model.lora.rank, c.model.lora.alpha, c.model.lora.init, c.model.lora.dropout) == (16, 16.0, "gaussian", 0.0)
    assert c.model.lora.targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (c.data.resolution, c.data.caption_dropout) == (512, 0.0)
    assert (c.cache.enabled, c.cache.dir) == (True, ".qflux-cache")
    t = c.train
    assert (t.max_steps, t.batch_size, t.grad_accum, t.lr, t.optimizer, t.scheduler, t.warmup_steps) == (
        1000, 1, 1, 1e-4, "adamw", "constant", 0)
    assert (t.timestep_sampling, t.mixed_precision, t.seed, t.save_every, t.max_grad_norm) == (
        "logit_normal", "no", 0, 250, 1.0)
    assert (c.loss.mask_weighting.foreground, c.loss.mask_weighting.background) == (2.0, 1.0)
    assert (c.validation.every, c.validation.steps, c.validation.seed, c.validation.samples) == (100, 20, 0, [])
    assert c.output.dir == "runs/my_run"


def test_empty_file_and_partial_sections_take_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == QfluxConfig()
    assert load_config(write(tmp_path, "# only a comment\n")) == QfluxConfig()
    c = load_config(write(tmp_path, "model:\n  lora:\n    rank: 4\ntrain: {lr: 0.001}\n"))
    assert c.model.lora.rank == 4 and c.model.lora.alpha == 16.0 and c.model.dtype == "bfloat16"
    assert c.train.lr == 0.001 and c.train.max_steps == 1000


def test_every_section_is_read_from_yaml() -> None:
    c = load_config(FIXTURES / "full.yaml")
    assert c.trainer == "qwen-edit-plus"
    assert c.model.pretrained == "Qwen/Qwen-Image-Edit-2509" and c.model.revision == "main"
    assert (c.model.dtype, c.model.quantize, c.model.quantize_skip) == ("float16", "nf4", ["norm"])
    assert c.model.gradient_checkpointing is True and c.model.options == {"guidance": 3.5} and c.model.max_sequence_length == 256
    assert c.model.lora.model_dump() == {"rank": 32, "alpha": 8.0, "targets": ["to_q", "to_v"], "init": "default",
                                         "dropout": 0.1, "dora": True, "rslora": True}
    assert c.data.resolution == [(512, 768), (768, 512)] and c.data.resize == "buckets"
    assert (c.data.control_resolution, c.data.caption_dropout, c.data.holdout, c.data.max_aspect) == (384, 0.05, 2, 3.0)
    assert c.data.columns == {"target": "edited", "prompt": "instruction"}
    assert (c.data.num_samples, c.data.workers) == (8, 2)
    assert c.cache.model_dump() == {"enabled": False, "dir": "/tmp/qflux-cache"}
    assert c.train.lr == 1e-4 and isinstance(c.train.lr, float)
    assert c.train.optimizer_args == {"betas": [0.9, 0.99], "eps": 1e-8}  # 1e-8 is a float, not the string "1e-8"
    assert (c.train.optimizer, c.train.scheduler, c.train.timestep_sampling, c.train.mixed_precision) == (
        "adamw8bit", "cosine", "shift", "bf16")
    assert (c.train.max_steps, c.train.batch_size, c.train.grad_accum, c.train.warmup_steps) == (500, 2, 4, 50)
    assert (c.train.max_grad_norm, c.train.keep_checkpoints, c.train.log_every, c.train.seed) == (None, 5, 10, 7)
    assert (c.loss.mask_weighting.foreground, c.loss.mask_weighting.background) == (3.0, 0.5)
    assert c.validation.every == 50 and c.validation.true_cfg == 4.0 and c.validation.from_holdout == 1
    first, second = c.validation.samples
    assert first.control == ["a.png", "b.png"] and first.target == "t.png"
    assert second.control == [] and second.prompt == "a red square" and second.negative_prompt == "blurry"
    assert c.output.dir == "runs/full"


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    c = load_config(FIXTURES / "full.yaml")
    again = load_config(write(tmp_path, yaml.safe_dump(c.model_dump(mode="json"))))
    assert again == c


def test_unquoted_no_for_mixed_precision(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as false; `mixed_precision: no` still means "no"."""
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("yaml_text", "key", "hint"),
    [
        ("model:\n  lora:\n    rnk: 4\n", "model.lora.rnk", "model.lora.rank"),
        ("model:\n  pretraind: x\n", "model.pretraind", "model.pretrained"),
        ("trainr: kontext\n", "trainr", "trainer"),
        ("train:\n  max_step: 3\n", "train.max_step", "train.max_steps"),
        ("model:\n  lr: 0.001\n", "model.lr", "train.lr"),  # a key in the wrong section
        ("lr: 0.001\n", "lr", "train.lr"),  # a section key at the top level
        ("rank: 4\n", "rank", "model.lora.rank"),
        ("loss:\n  foreground: 3\n", "loss.foreground", "loss.mask_weighting.foreground"),
        ("validation:\n  samples:\n    - {prompt: a, contrl: [x.png]}\n", "validation.samples[0].contrl",
         "validation.samples[0].control"),
    ],
)
def test_unknown_key_names_its_full_path_and_suggests(tmp_path: Path, yaml_text: str, key: str, hint: str) -> None:
    path = write(tmp_path, yaml_text)
    msg = error_of(path)
    assert str(path) in msg
    assert f"unknown key '{key}'" in msg
    assert f"did you mean '{hint}'?" in msg


def test_key_in_two_other_sections_lists_both() -> None:
    msg = error_of(overrides=["model.seed=1"])
    assert "unknown key 'model.seed'" in msg and "'train.seed' or 'validation.seed'" in msg


def test_unknown_key_without_a_close_match_has_no_hint() -> None:
    msg = error_of(overrides=["model.lora.zzzzzz=1"])
    assert "unknown key 'model.lora.zzzzzz'" in msg and "did you mean" not in msg


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "model:\n  lora: {rnk: 4}\ntrain:\n  max_steps: many\n  lrr: 1\n"))
    lines = [line for line in msg.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 3
    assert "model.lora.rnk" in msg and "'train.max_steps'" in msg and "train.lrr" in msg


# --------------------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.max_steps=many", "train.max_steps", "valid integer"),
        ("train.lr=fast", "train.lr", "valid number"),
        ("model.dtype=fp32", "model.dtype", "'float32', 'bfloat16' or 'float16'"),
        ("cache.enabled=maybe", "cache.enabled", "valid boolean"),
        ("model.lora=3", "model.lora", "valid dictionary"),
        ("model.lora.targets=to_q", "model.lora.targets", "valid list"),
        ("trainer=[a, b]", "trainer", "valid string"),
        ("data.resolution=big", "data.resolution", "expected one int (a square's pixel budget, e.g. 512), [h, w]"),
        ("data.resolution=500", "data.resolution", "multiples of 16"),
        ("model.lora.rank=0", "model.lora.rank", "greater than or equal to 1"),
        ("data.caption_dropout=1.5", "data.caption_dropout", "less than or equal to 1"),
        ("train.timestep_sampling=cosine", "train.timestep_sampling", "'uniform'"),
        ("validation.samples=[{control: [a.png]}]", "validation.samples[0].prompt", "required"),
        ("data.columns.target=3", "data.columns.target", "valid string"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override: str, key: str, expected: str) -> None:
    msg = error_of(overrides=[override])
    assert f"'{key}'" in msg
    assert expected in msg
    assert len([line for line in msg.splitlines() if line.strip().startswith("- ")]) == 1  # one line per mistake


def test_wrong_type_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  batch_size: two\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: invalid config") and "'train.batch_size'" in msg and "(got 'two')" in msg


# --------------------------------------------------------------------------- --set overrides


def test_set_values_are_parsed_as_yaml() -> None:
    assert parse_overrides(["train.lr=2e-4", "a.b=3", "x=[1, 2]", "y={k: v}", "z=null", "s=hello", "t=true", "e="]) == [
        (["train", "lr"], 2e-4), (["a", "b"], 3), (["x"], [1, 2]), (["y"], {"k": "v"}), (["z"], None),
        (["s"], "hello"), (["t"], True), (["e"], ""),
    ]
    assert parse_overrides(["validation.samples=[{prompt: 'a=b'}]"]) == [
        (["validation", "samples"], [{"prompt": "a=b"}])]  # only the first '=' splits


def test_set_overrides_file_values_and_creates_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer: kontext\ntrain:\n  lr: 0.001\n  max_steps: 10\n")
    c = load_config(path, [
        "train.lr=2e-4",                        # a number (YAML 1.2 style exponent)
        "model.lora.rank=32",                   # sections missing from the file are created
        "data.resolution=[512, 768]",           # a list
        "model.lora.targets=[to_q, to_k]",
        "validation.samples=[{control: [a.png], prompt: red hat}]",  # nested mappings
        "model.quantize=null",
        "train.max_steps=20",
        "train.max_steps=30",                   # later overrides win
    ])
    assert c.train.lr == 2e-4 and c.train.max_steps == 30
    assert c.model.lora.rank == 32 and c.model.lora.targets == ["to_q", "to_k"]
    assert c.data.resolution == (512, 768)
    assert c.validation.samples[0].control == ["a.png"] and c.validation.samples[0].prompt == "red hat"
    assert c.model.quantize is None


def test_trainer_option_applies_last(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer: kontext\n")
    assert load_config(path, ["trainer=qwen-edit"], trainer="qwen-edit-2511").trainer == "qwen-edit-2511"
    assert load_config(path, ["trainer=qwen-edit"]).trainer == "qwen-edit"


def test_set_with_an_unknown_key_gets_the_same_hint() -> None:
    msg = error_of(overrides=["model.lora.rnk=8"])
    assert "unknown key 'model.lora.rnk' (did you mean 'model.lora.rank'?)" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "--set 'train.lr': expected KEY=VALUE"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("train.lr=[1e-4", "--set 'train.lr=[1e-4': the value is not valid YAML"),
    ],
)
def test_bad_set_syntax(override: str, expected: str) -> None:
    assert expected in error_of(overrides=[override])


def test_set_through_a_value_that_is_not_a_section(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr.x=1"])
    assert "--set train.lr.x" in msg and "train.lr is not a section" in msg


# --------------------------------------------------------------------------- files


def test_invalid_yaml_reports_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer: kontext\nmodel:\n  lora:\n    rank: [16\n  dtype: float32\n")
    msg = error_of(path)
    assert str(path) in msg and "invalid YAML" in msg
    assert "line 5" in msg


def test_tab_indentation_is_invalid_yaml_with_line(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "model:\n\tdtype: float32\n"))
    assert "invalid YAML (line 2" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "- trainer: kontext\n"))
    assert "top level must be a mapping" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    msg = error_of(path)
    assert msg == f"config file not found: {path}"
    assert "not found" in error_of(tmp_path)  # a folder is not a config file


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert "not a UTF-8 text file" in error_of(path)
