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
