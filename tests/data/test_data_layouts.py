"""The layouts users already have: separate target / control / mask folders (ai-toolkit, musubi-tuner), files the
qflux layout does not read (reported, never dropped silently), and the manifest format docs/data.md shows."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_fork_server import run_qflux_process

from qflux.config.schema import DataConfig
from qflux.data import FileImage, load_sample, open_records, scan_dataset
from qflux.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def data(path: str | Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), resolution=kw.pop("resolution", 32), **kw)


def targets(root: Path, write_image, stems=("a", "b", "c"), ext: str = "jpg") -> Path:
    for stem in stems:
        write_image(root / f"{stem}.{ext}", (48, 32))
        (root / f"{stem}.txt").write_text(f"edit {stem}", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- separate folders


def test_ai_toolkit_folder_path_control_path_and_mask_path(tmp_path, write_image):
    targets(tmp_path / "aitk" / "targets", write_image)
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "aitk" / "controls" / f"{stem}.png", (32, 32), (9, 160, 60))
        write_image(tmp_path / "aitk" / "masks" / f"{stem}.png", (48, 32), mode="L")
    config = data("aitk/targets", control_path="aitk/controls", mask_path="aitk/masks")  # relative: base_dir
    records = open_records(config, base_dir=tmp_path)
    root = tmp_path / "aitk"
    assert [r.key for r in records] == ["a", "b", "c"]
    assert records[0].target == FileImage(root / "targets" / "a.jpg")
    assert records[0].controls == (FileImage(root / "controls" / "a.png"),)
    assert records[0].mask == FileImage(root / "masks" / "a.png")
    assert records[0].prompt == "edit a"
    sample = load_sample(records[1], config)
    assert len(sample.controls) == 1 and sample.mask.size == sample.target.size


def test_a_list_of_control_folders_is_one_folder_per_slot(tmp_path, write_image):
    targets(tmp_path / "t", write_image)
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "c1" / f"{stem}.png", (32, 32))
    for stem in ("a", "c"):
        write_image(tmp_path / "c2" / f"{stem}.png", (32, 48))
        write_image(tmp_path / "c3" / f"{stem}.png", (48, 48))
    write_image(tmp_path / "c3" / "b.png", (48, 48))  # b has slots 0 and 2 but no 1: the controls would shift
    scan = scan_dataset(data(tmp_path / "t", control_path=[str(tmp_path / c) for c in ("c1", "c2", "c3")]))
    by_key = {r.key: r for r in scan.records}
    assert by_key["a"].controls == tuple(FileImage(tmp_path / c / "a.png") for c in ("c1", "c2", "c3"))
    assert [str(p) for p in scan.warnings] == [
        f"{tmp_path / 'c3' / 'b.png'}: 'b' has no control c2/b.png but a later one: controls are used in order, "
        "add the missing one"
    ]


def test_musubi_numbered_controls_in_one_folder(tmp_path, write_image):
    targets(tmp_path / "img", write_image, stems=("a", "b", "x_1"))
    for name in ("a_1", "a_0", "b_0", "x_1"):  # x_1 is a target's own name: its control, not x's
        write_image(tmp_path / "ctl" / f"{name}.png", (32, 32))
    records = {r.key: r for r in open_records(data(tmp_path / "img", control_path=str(tmp_path / "ctl")))}
    assert records["a"].controls == (FileImage(tmp_path / "ctl" / "a_0.png"), FileImage(tmp_path / "ctl" / "a_1.png"))
    assert records["b"].controls == (FileImage(tmp_path / "ctl" / "b_0.png"),)
    assert records["x_1"].controls == (FileImage(tmp_path / "ctl" / "x_1.png"),)

    write_image(tmp_path / "ctl" / "a_1.jpg", (32, 32))  # two files for one number
    with pytest.raises(DataError, match=r"duplicate control 1 for 'a': a_1\.jpg, a_1\.png"):
        open_records(data(tmp_path / "img", control_path=str(tmp_path / "ctl")))
    (tmp_path / "ctl" / "a_1.jpg").unlink()
    write_image(tmp_path / "ctl" / "b.png", (32, 32))  # plain and numbered: which one is meant?
    with pytest.raises(DataError, match=r"'b' has both a control named like the target and numbered ones in ctl/ "
                                        r"\(b\.png, b_0\.png\)"):
        open_records(data(tmp_path / "img", control_path=str(tmp_path / "ctl")))


def test_control_and_mask_path_mistakes(tmp_path, write_image, make_folder):
    flat = targets(tmp_path / "flat", write_image)
    with pytest.raises(DataError, match=r"data.control_path nowhere: not found"):
        open_records(data(flat, control_path="nowhere"), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"data.control_path\[1\] nowhere: not found"):
        open_records(data(flat, control_path=[str(flat), "nowhere"]), base_dir=tmp_path)
    with pytest.raises(DataError, match="data.mask_path flat/a.txt: is a file, not a folder"):
        open_records(data(flat, control_path=str(flat), mask_path="flat/a.txt"), base_dir=tmp_path)
    with pytest.raises(DataError, match="data.control_path is an empty list"):
        open_records(data(flat, control_path=[]))
    root = make_folder({"a": {"controls": [(32, 32)]}})
    with pytest.raises(DataError, match=re.escape(f"set data.path to {root / 'training_images'}")):
        open_records(data(root, control_path=str(root / "control_images")))
    (tmp_path / "m.jsonl").write_text('{"target": "flat/a.jpg", "prompt": "x"}\n', encoding="utf-8")
    for key in ("control_path", "mask_path"):
        with pytest.raises(DataError, match=f"data.{key} works with a folder data.path"):
            open_records(data(tmp_path / "m.jsonl", **{key: str(flat)}))
        with pytest.raises(DataError, match=f"data.{key} works with a folder data.path"):
            open_records(data("builtin:shapes", **{key: str(flat)}))


def test_a_flat_folder_points_at_control_path_and_the_sibling_folder(tmp_path, write_image):
    targets(tmp_path / "images", write_image)
    for stem in ("a", "b"):
        write_image(tmp_path / "conditioning" / f"{stem}.png")
    with pytest.raises(DataError) as err:
        open_records(data(tmp_path / "images"))
    message = str(err.value)
    assert "no training_images/ subfolder" in message and "set data.control_path to the control folder" in message
    assert f"probably {tmp_path / 'conditioning'}" in message


# --------------------------------------------------------------------------- nothing dropped silently


def test_qflux_layout_reports_what_it_does_not_read(make_folder, write_image, tmp_path):
    root = make_folder({"a": {"controls": [(32, 32)]}, "b": {"controls": [(32, 32)], "prompt": None},
                        "c": {"controls": [(32, 32)]}})
    t, c = root / "training_images", root / "control_images"
    write_image(t / "batch2" / "extra.png")
    (t / "batch2" / "extra.txt").write_text("x", encoding="utf-8")
    (t / "notes.md").write_text("my notes", encoding="utf-8")
    (t / ".DS_Store").write_bytes(b"\0")  # hidden files are no one's data: ignored
    (c / "b.txt").write_text("the caption of b, in the wrong folder", encoding="utf-8")
    (c / "a.txt").write_text("a second caption of a", encoding="utf-8")
    write_image(root / "masks" / "a.png", mode="L")
    write_image(root / "cover.png")
    write_image(root / "grids" / "step-000100.png")  # images named like no target: a note, not a problem
    scan = scan_dataset(data(root))
    skipped = {Path(p.file).relative_to(root).as_posix(): p.reason for p in scan.skipped}
    assert set(skipped) == {"training_images/batch2", "training_images/notes.md", "control_images/a.txt", "grids",
                            "cover.png"}
    assert "subfolder not read (1 image(s), 2 file(s))" in skipped["training_images/batch2"]
    assert "the prompt of 'a' is training_images/a.txt" in skipped["control_images/a.txt"]
    assert "folder not read (1 image(s))" in skipped["grids"]
    assert "not read" in skipped["cover.png"]
    # a folder of images named like the targets inside the dataset folder was meant to be read: a problem
    [masks] = [p.reason for p in scan.warnings if p.file == str(root / "masks")]
    assert "1 of its 1 image(s) are named like the targets" in masks and "set data.mask_path to it" in masks
    missing = [p.reason for p in scan.warnings if p.file == str(t / "b.txt")]
    assert missing == ["missing prompt: add training_images/b.txt with the edit instruction; control_images/b.txt "
                       "is not read there: move it to training_images/b.txt"]
    assert [r.key for r in scan.records] == ["a", "b", "c"]


def test_mask_path_adds_masks_to_the_qflux_layout(make_folder, write_image, tmp_path):
    root = make_folder({"a": {"controls": [(32, 32)]}, "b": {"controls": [(32, 32)], "mask": (48, 32)}})
    write_image(tmp_path / "masks" / "a.png", mode="L")
    records = {r.key: r for r in open_records(data(root, mask_path=str(tmp_path / "masks")))}
    assert records["a"].mask == FileImage(tmp_path / "masks" / "a.png")
    assert records["b"].mask == FileImage(root / "control_images" / "b_mask.png")
    write_image(tmp_path / "masks" / "b.png", mode="L")
    with pytest.raises(DataError, match="duplicate mask for 'b'"):
        open_records(data(root, mask_path=str(tmp_path / "masks")))


# --------------------------------------------------------------------------- the manifest format of docs/data.md


def test_docs_manifest_examples_read_as_documented(tmp_path, write_image):
    text = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    csv_text = re.search(r"```csv\n(.*?)```", text, flags=re.S)[1]
    jsonl_text = re.search(r"```jsonl\n(.*?)```", text, flags=re.S)[1]
    for name in re.findall(r"[\w/]+\.png", csv_text + jsonl_text):
        write_image(tmp_path / name, (48, 32), mode="L" if name.startswith("masks/") else "RGB")
    (tmp_path / "train.csv").write_text(csv_text, encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(jsonl_text, encoding="utf-8")

    rows = open_records(data(tmp_path / "train.csv"))
    assert [(r.key, len(r.controls), r.mask is not None) for r in rows] == [
        ("cat", 1, True), ("dog", 2, False), ("sky", 0, False)]
    assert rows[1].controls[1] == FileImage(tmp_path / "inputs" / "dog_style.png")
    assert rows[0].prompt == "make the cat orange"
    rows = open_records(data(tmp_path / "train.jsonl"))
    assert [(r.key, len(r.controls)) for r in rows] == [("cat", 1), ("dog", 2), ("sky-01", 0)]


# --------------------------------------------------------------------------- real runs


def _train(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QFLUX_LOAD_PLUGINS", "PYTHONPATH")}
    env.update(QFLUX_LOAD_PLUGINS="kontext", COLUMNS="200", NO_COLOR="1")
    return run_qflux_process(["train", config, *extra], config.parent, env, timeout=600)


@pytest.mark.slow
def test_train_on_separate_folders_and_with_allow_no_controls(tmp_path, write_image):
    pytest.importorskip("qflux_kontext")
    from qflux.testing import tiny_config, write_config

    targets(tmp_path / "aitk" / "targets", write_image, ext="png")
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "aitk" / "controls" / f"{stem}.png", (48, 32), (9, 160, 60))
    data_keys = {"path": "aitk/targets", "control_path": "aitk/controls", "resolution": 32, "holdout": 0,
                 "control_resolution": "target"}
    fast = {"max_steps": 2, "save_every": 0, "batch_size": 1}
    separate = write_config(tmp_path / "separate.yaml", tiny_config(tmp_path, data=data_keys, train=fast,
                                                                    output={"dir": str(tmp_path / "run1")}))
    result = _train(separate)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run1" / "pytorch_lora_weights.safetensors").is_file()

    # the same pairs with ai-toolkit's folder names next to training_images/: refused, then allowed on purpose
    (tmp_path / "aitk" / "targets").rename(tmp_path / "aitk" / "training_images")
    plain = dict(data_keys, path="aitk")
    del plain["control_path"]
    config = write_config(tmp_path / "t2i.yaml", tiny_config(tmp_path, data=plain, train=fast,
                                                             output={"dir": str(tmp_path / "run2")}))
    refused = _train(config)
    assert refused.returncode == 2 and "no sample has a control image" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "run2").exists()
    allowed = _train(config, "--allow-no-controls")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "WARNING" in allowed.stderr and "no sample has a control image" in allowed.stderr
    assert yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())["data"]["allow_no_controls"] is True
