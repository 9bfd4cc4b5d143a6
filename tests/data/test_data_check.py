"""``check_dataset`` finds every planted problem, and ``qflux data check`` reports them (exit 1) or says ok."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data import check_dataset
from qflux.errors import DataError

QFLUX = Path(sys.executable).with_name("qflux")


@pytest.fixture
def planted(make_folder, write_image) -> tuple[Path, dict[str, str]]:
    """A folder with good samples and one of each problem; returns (root, {file: expected reason fragment})."""
    good = {f"good{i}": {"controls": [(32, 32)]} for i in range(4)}
    root = make_folder(
        {
            **good,
            "noprompt": {"prompt": None, "controls": [(32, 32)]},
            "emptyprompt": {"prompt": "  \n ", "controls": [(32, 32)]},
            "badmask": {"size": (48, 32), "controls": [(32, 32)], "mask": (32, 32)},
            "wide": {"size": (320, 32), "controls": [(32, 32)]},
            "nocontrol": {},
            "trunc": {"controls": [(32, 32)]},
            "garbage": {"controls": [(32, 32)]},
            "dup": {"controls": [(32, 32)]},
        },
        name="planted",
    )
    t, c = root / "training_images", root / "control_images"
    data = (t / "trunc.png").read_bytes()
    (t / "trunc.png").write_bytes(data[: len(data) // 2])
    (t / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    write_image(t / "dup.jpg")
    write_image(c / "orphan.png")  # a control without a target
    (t / "orphan.txt").write_text("no image for this prompt", encoding="utf-8")
    Image.new("RGB", (32, 32)).save(t / "legacy.bmp")
    expected = {
        str(t / "noprompt.txt"): "missing prompt",
        str(t / "emptyprompt.txt"): "empty prompt",
        str(c / "badmask_mask.png"): "mask is 32x32 but the target is 48x32",
        str(t / "wide.png"): "extreme aspect ratio 320x32",
        str(t / "nocontrol.png"): "has 0 control image(s) while 10 of 11 samples have 1",
        str(t / "trunc.png"): "cannot read the target image",
        str(t / "garbage.png"): "cannot read the target image",
        str(t / "dup.jpg"): "duplicate target image for 'dup': dup.jpg, dup.png",
        str(c / "orphan.png"): "no target image",
        str(t / "orphan.txt"): "no target image",
        str(t / "legacy.bmp"): "unsupported image type '.bmp'",
    }
    return root, expected


def test_check_finds_every_planted_problem(planted):
    root, expected = planted
    problems = check_dataset(DataConfig(path=str(root), resolution=32))
    found = {p.file: p.reason for p in problems}
    for file, reason in expected.items():
        assert file in found, f"{file} not reported; got {problems}"
        assert reason in found[file], (file, found[file])
    assert len(problems) == len(expected), problems
    assert not any("good" in p.file for p in problems)
    # with workers, the same report
    assert check_dataset(DataConfig(path=str(root), resolution=32, workers=2)) == problems


def test_check_reports_manifest_problems_and_trainer_control_limit(tmp_path, write_image):
    root = tmp_path / "m"
    for name in ("t", "c1", "c2"):
        write_image(root / f"{name}.png")
    write_image(tmp_path / "secret.png")
    (root / "m.csv").write_text(
        "target,control,control_1,prompt\n"
        "t.png,c1.png,c2.png,two controls\n"
        "t.png,../secret.png,,escapes\n"
        "gone.png,c1.png,,missing target\n"
        "t.png,c1.png,c2.png,\n",
        encoding="utf-8",
    )
    problems = check_dataset(DataConfig(path=str(root / "m.csv"), resolution=32), max_controls=1)
    text = "\n".join(map(str, problems))
    assert "line 3: column 'control': ../secret.png is outside the dataset folder" in text
    assert f"{root / 'gone.png'}: file not found" in text
    assert "line 5: empty prompt" in text
    assert text.count("the trainer takes at most 1") == 2
    with pytest.raises(DataError, match="not found"):
        check_dataset(DataConfig(path=str(tmp_path / "missing")))


def _qflux(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QFLUX_LOAD_PLUGINS": ""}
    return subprocess.run([str(QFLUX), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_cli_data_check(planted, make_folder, tmp_path):
    root, expected = planted
    (tmp_path / "cfg.yaml").write_text(f"data:\n  path: {root}\n  resolution: 32\n", encoding="utf-8")
    bad = _qflux("data", "check", "--config", "cfg.yaml", cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    for file in expected:  # shown relative to the current directory
        assert str(Path(file).relative_to(tmp_path)) in bad.stdout, file
    assert f"{len(expected)} problem(s)" in bad.stdout

    clean = make_folder({"a": {"controls": [(32, 32)]}, "b": {"controls": [(48, 32)]}}, name="clean")
    ok = _qflux("data", "check", "--config", "cfg.yaml", "--set", f"data.path={clean}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 samples ok" in ok.stdout

    missing = _qflux("data", "check", "--config", "cfg.yaml", "--set", "data.path=nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr


# --------------------------------------------------------------------------- the report (issue 14)


def test_report_counts_controls_masks_sizes_holdout_and_skipped(make_folder, write_image):
    from qflux.data import inspect_dataset

    root = make_folder(
        {
            "one_a": {"size": (64, 48), "controls": [(32, 32)], "mask": (64, 48)},
            "one_b": {"size": (64, 48), "controls": [(32, 32)], "mask": (64, 48)},
            "one_c": {"size": (48, 64), "controls": [(32, 32)], "mask": (48, 64)},
            "two": {"size": (32, 32), "controls": [(32, 32), (32, 32)], "mask": (32, 32)},
            "t2i": {"size": (64, 48), "mask": (64, 48)},
        },
        name="report",
    )
    write_image(root / "training_images" / "more" / "x.png")
    report = inspect_dataset(DataConfig(path=str(root), resolution=64, holdout=2))
    assert report.samples == 5 and report.source == f"folder {root}"
    assert report.controls == {0: 1, 1: 3, 2: 1}
    assert report.masks == 5
    assert report.resize == "budget 64x64 px, aspect kept"
    assert report.sizes == {(80, 48): 3, (48, 80): 1, (64, 64): 1}  # (w, h) at about 64*64 pixels
    assert len(report.held_out) == 2 and set(report.held_out) <= {"one_a", "one_b", "one_c", "two", "t2i"}
    assert [Path(p.file).name for p in report.skipped] == ["more"]
    lines = {line.label: line for line in report.lines()}
    assert lines["controls"].text == "1 with 0 (text-to-image), 3 with 1, 1 with 2"
    assert lines["masks"].text == "5 of 5"
    assert lines["held out"].text.startswith("2 (") and lines["held out"].text.endswith("; 3 train")
    assert lines["skipped"].details and "subfolder not read" in lines["skipped"].details[0]

    buckets = inspect_dataset(DataConfig(path=str(root), resolution=[(32, 32), (32, 48), (48, 32)], holdout=9))
    assert buckets.resize == "aspect buckets"
    assert buckets.sizes == {(48, 32): 3, (32, 48): 1, (32, 32): 1}
    assert len(buckets.held_out) == 4 and "holding out 4" in buckets.holdout_note


def test_an_edit_trainer_refuses_a_dataset_without_controls_naming_the_unread_folder(make_folder, write_image,
                                                                                     tmp_path):
    from qflux.data import inspect_dataset, validate_dataset

    root = make_folder({f"p{i}": {} for i in range(3)}, name="aitk")
    for i in range(3):
        write_image(root / "controls" / f"p{i}.png")
    config = DataConfig(path=str(root), resolution=32)
    # no trainer, no control requirement; the folder of images named like the targets is still a problem
    [unread] = inspect_dataset(config).problems
    assert unread.file == str(root / "controls") and unread.reason.startswith("folder not read: 3 of its 3 image(s)")
    report = inspect_dataset(config, needs_controls=True)
    [problem] = report.problems
    assert problem.file == str(root / "controls")
    assert "no sample has a control image" in problem.reason and "all 3 samples would train as text-to-image" \
        in problem.reason
    assert f"{root / 'controls'} holds 3 image(s) named like the targets and is not read: rename it " \
           "control_images/" in problem.reason
    assert "--allow-no-controls" in problem.reason
    with pytest.raises(DataError, match="no sample has a control image"):
        validate_dataset(config, needs_controls=True)

    allowed = inspect_dataset(DataConfig(path=str(root), resolution=32, allow_no_controls=True), needs_controls=True)
    assert allowed.ok and len(allowed.warnings) == 1 and "training anyway" in allowed.warnings[0].reason

    # separate folders whose control folder holds no image named like a target: the same refusal
    other = tmp_path / "ctl"
    write_image(other / "unrelated.png")
    separate = DataConfig(path=str(root / "training_images"), control_path=str(other), resolution=32)
    reasons = [p.reason for p in inspect_dataset(separate, needs_controls=True).problems]
    assert any("no sample has a control image" in r for r in reasons), reasons


def test_masks_that_mark_nothing_and_a_forgotten_mask(make_folder):
    import numpy as np

    from qflux.data import inspect_dataset

    root = make_folder({s: {"controls": [(32, 32)], "mask": (48, 32)} for s in ("good", "black", "binary", "nomask")},
                       name="masks")
    c = root / "control_images"
    Image.new("L", (48, 32), 0).save(c / "black_mask.png")
    binary = np.zeros((32, 48), dtype=np.uint8)
    binary[4:20, 4:30] = 1
    Image.fromarray(binary).save(c / "binary_mask.png")
    (c / "nomask_mask.png").unlink()
    problems = {Path(p.file).name: p.reason for p in inspect_dataset(DataConfig(path=str(root), resolution=32)).problems}
    assert set(problems) == {"black_mask.png", "binary_mask.png", "nomask.png"}, problems
    assert problems["black_mask.png"].startswith("the mask is all black")
    assert "only the values 0 and 1, so it looks all black" in problems["binary_mask.png"]
    assert "'nomask' has no mask while 3 of 4 samples have one" in problems["nomask.png"]


def test_cli_data_check_reports_and_allow_no_controls(make_folder, write_image, tmp_path):
    root = make_folder({f"p{i}": {"size": (64, 48)} for i in range(3)}, name="aitk")
    for i in range(3):
        write_image(root / "controls" / f"p{i}.png")
    (tmp_path / "cfg.yaml").write_text(f"data:\n  path: {root}\n  resolution: 32\n  holdout: 1\n", encoding="utf-8")
    refused = _qflux("data", "check", "--config", "cfg.yaml", cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    out = " ".join(refused.stdout.split())
    assert "no sample has a control image" in out and "aitk/controls holds 3 image(s)" in out
    assert "controls 3 with 0 (text-to-image)" in out and "held out 1 (" in out
    assert "sizes budget 32x32 px, aspect kept: 32x32 x3" in out

    allowed = _qflux("data", "check", "--config", "cfg.yaml", "--allow-no-controls", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    text = " ".join(allowed.stdout.split())
    assert "warning: aitk/controls: no sample has a control image" in text and "3 samples ok" in text
    assert "skipped nothing" in text  # the unread folder is named once, in the warning
