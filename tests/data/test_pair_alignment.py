"""``qflux.data.alignment``: control/target pairs measured outside the mask, on real files of a folder dataset
(textured images drawn analytically, so a shift or zoom between control and target is exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data.alignment import measure_dataset, misaligned
from qflux.data.sources import scan_dataset


def texture(w: int, h: int, dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0, seed: int = 0) -> np.ndarray:
    """``HxWx3`` uint8: a scene of random blobs moved by (dx, dy) px and magnified by ``zoom`` about the centre
    (the scene is defined in ``w``-relative units, so other sizes show the same framing)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # pixel centres at (i + 0.5) / w: a 2x larger image then holds exactly the same scene
    u, v = ((xs - cx - dx) / zoom + cx + 0.5) / w, ((ys - cy - dy) / zoom + cy + 0.5) / w
    image = np.zeros((h, w, 3))
    for _ in range(200):
        px, py, s = rng.uniform(-0.3, 1.3), rng.uniform(-0.3, 1.3) * h / w, rng.uniform(0.01, 0.05)
        image += rng.uniform(-1, 1, 3) * np.exp(-((u - px) ** 2 + (v - py) ** 2) / (2 * s * s))[..., None]
    return (np.clip(0.5 + 0.12 * image, 0, 1) * 255).round().astype(np.uint8)


def write_pair(root: Path, stem: str, target: np.ndarray, control: np.ndarray, mask: np.ndarray | None = None) -> None:
    (root / "training_images").mkdir(parents=True, exist_ok=True)
    (root / "control_images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(target).save(root / "training_images" / f"{stem}.png")
    (root / "training_images" / f"{stem}.txt").write_text("an edit")
    Image.fromarray(control).save(root / "control_images" / f"{stem}.png")
    if mask is not None:
        Image.fromarray(mask).save(root / "control_images" / f"{stem}_mask.png")


def measure(root: Path):
    return measure_dataset(scan_dataset(DataConfig(path=str(root))).records)


def test_clean_dataset_reports_nothing(tmp_path):
    root = tmp_path / "ds"
    write_pair(root, "same", texture(160, 120), texture(160, 120))
    # an edit inside the mask (the edited region is a moved copy: only the mask keeps it out of the measurement)
    target, mask = texture(160, 120, seed=1), np.zeros((120, 160), dtype=np.uint8)
    target[30:90, 40:120] = texture(160, 120, dx=9, seed=1)[30:90, 40:120]
    mask[30:90, 40:120] = 255
    write_pair(root, "edited", target, texture(160, 120, seed=1), mask)
    write_pair(root, "larger", texture(160, 120, seed=2), texture(320, 240, seed=2))  # same framing, 2x size
    pairs = measure(root)
    assert sorted(p.key for p in pairs) == ["edited", "larger", "same"]
    assert all(p.alignment.shift_px < 0.3 and abs(p.alignment.zoom - 1) < 0.005 for p in pairs), pairs
    assert misaligned(pairs) == []


def test_builtin_shapes_is_clean():
    records = scan_dataset(DataConfig(path="builtin:shapes", resolution=64, num_samples=6)).records
    pairs = measure_dataset(records)
    assert pairs and misaligned(pairs) == []


@pytest.mark.parametrize("dx,dy", [(6, 0), (0, -4)])
def test_shifted_control_is_listed_with_stem_and_shift(tmp_path, dx, dy):
    root = tmp_path / "ds"
    write_pair(root, "ok", texture(160, 120), texture(160, 120))
    # the target shows the scene moved by (dx, dy) against its control
    write_pair(root, "off", texture(160, 120, dx=dx, dy=dy, seed=3), texture(160, 120, seed=3))
    pairs = measure(root)
    off = next(p for p in pairs if p.key == "off")
    assert abs(off.alignment.dx - dx) <= 0.5 and abs(off.alignment.dy - dy) <= 0.5  # a flipped sign fails
    warnings = misaligned(pairs)
    assert [w.file for w in warnings] == [str(root / "control_images" / "off.png")]
    assert f"'off': the target is shifted by {abs(dx + dy):.1f} px" in warnings[0].reason


def test_zoomed_control_is_listed(tmp_path):
    root = tmp_path / "ds"
    write_pair(root, "zoomed", texture(160, 120, zoom=1.05, seed=4), texture(160, 120, seed=4))
    (warning,) = misaligned(measure(root))
    assert "zoomed 1.05" in warning.reason and "'zoomed'" in warning.reason


def test_tolerances_decide(tmp_path):
    root = tmp_path / "ds"
    write_pair(root, "slight", texture(160, 120, dx=2, seed=5), texture(160, 120, seed=5))
    pairs = measure(root)
    assert len(misaligned(pairs)) == 1
    assert misaligned(pairs, shift_tolerance=3.0) == []


def test_control_of_another_aspect_is_not_measured(tmp_path):
    root = tmp_path / "ds"
    write_pair(root, "square", texture(160, 120), texture(120, 120))
    assert measure(root) == []


def test_data_check_cli_lists_misaligned_pairs_as_warnings(tmp_path):
    """``qflux data check``: a warning with the stem and the measured shift, exit 0 (a warning, not an error);
    a clean dataset says all pairs are aligned."""
    from typer.testing import CliRunner

    from qflux.cli.main import app
    from qflux.testing import tiny_config, write_config

    root = tmp_path / "ds"
    write_pair(root, "fine", texture(160, 120), texture(160, 120))
    write_pair(root, "moved", texture(160, 120, dx=-5, seed=7), texture(160, 120, seed=7))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"path": str(root), "holdout": 0}))
    result = CliRunner().invoke(app, ["data", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "2 same-aspect control/target pair(s) measured outside the mask: 1 shifted" in output
    assert "warning:" in output and "'moved': the target is shifted by 5.0 px (dx -5.0, dy +0.0)" in output
    assert "'fine'" not in output

    (root / "control_images" / "moved.png").unlink()
    (root / "training_images" / "moved.png").unlink()
    (root / "training_images" / "moved.txt").unlink()
    clean = CliRunner().invoke(app, ["data", "check", "--config", str(config)])
    assert clean.exit_code == 0 and "all aligned" in clean.output and "warning" not in clean.output
