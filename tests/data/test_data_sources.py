"""Every source kind of ``open_records``: folder layout, CSV and JSONL manifests, a local HF dataset, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data import FileImage, load_sample, open_records, split_holdout
from qflux.errors import DataError


def data(path: str | Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), resolution=kw.pop("resolution", 64), **kw)


# --------------------------------------------------------------------------- folder layout


def test_folder_layout_controls_masks_and_order(make_folder, write_image):
    root = make_folder(
        {
            "b_pair": {"size": (96, 64), "controls": [(64, 64), (128, 96)], "mask": (96, 64)},
            "a_single": {"size": (64, 64), "controls": [(48, 32)]},
            "c_t2i": {"size": (64, 96)},
        }
    )
    # an upper-case extension is a target too; a JPEG control is a control too
    write_image(root / "training_images" / "d_upper.PNG", (64, 64))
    (root / "training_images" / "d_upper.txt").write_text("  make the sky green \n", encoding="utf-8")
    write_image(root / "control_images" / "d_upper.JPEG", (32, 64))

    records = open_records(data(root))
    assert [r.key for r in records] == ["a_single", "b_pair", "c_t2i", "d_upper"]
    by_key = {r.key: r for r in records}
    assert [len(by_key[k].controls) for k in ("a_single", "b_pair", "c_t2i", "d_upper")] == [1, 2, 0, 1]
    assert by_key["b_pair"].controls[1] == FileImage(root / "control_images" / "b_pair_control_1.png")
    assert by_key["b_pair"].mask == FileImage(root / "control_images" / "b_pair_mask.png")
    assert by_key["a_single"].mask is None
    assert by_key["d_upper"].target == FileImage(root / "training_images" / "d_upper.PNG")
    assert by_key["b_pair"].origin == str(root / "training_images" / "b_pair.png")

    sample = load_sample(by_key["b_pair"], data(root))
    # target 96x64 at a 64*64 budget: w = sqrt(4096*1.5)=78.4 -> 80, h = sqrt(4096/1.5)=52.3 -> 48
    assert sample.target.size == (80, 48)
    # controls keep their own aspect at the target's planned area (80*48 = 3840 px)
    assert sample.controls[0].size == (64, 64)  # sqrt(3840)=62 -> 64
    assert sample.controls[1].size == (64, 48)  # 4:3: w = sqrt(3840*4/3) = 71.6 -> 64, h = 53.7 -> 48
    assert sample.mask.size == sample.target.size and sample.mask.mode == "L"
    assert sample.prompt == "edit b_pair"
    assert set(sample.files) == {
        root / "training_images" / "b_pair.png",
        root / "training_images" / "b_pair.txt",
        root / "control_images" / "b_pair.png",
        root / "control_images" / "b_pair_control_1.png",
        root / "control_images" / "b_pair_mask.png",
    }
    assert load_sample(by_key["d_upper"], data(root)).prompt == "make the sky green"
    assert load_sample(by_key["c_t2i"], data(root)).controls == []


def test_folder_relative_path_uses_base_dir(make_folder, tmp_path):
    make_folder({"a": {}, "b": {}}, name="rel")
    assert [r.key for r in open_records(data("rel"), base_dir=tmp_path)] == ["a", "b"]


def test_folder_duplicate_stem_is_an_error(make_folder, write_image):
    root = make_folder({"a": {}, "b": {}})
    write_image(root / "training_images" / "a.jpg")
    with pytest.raises(DataError, match=r"duplicate target image for 'a': a\.jpg, a\.png"):
        open_records(data(root))


def test_folder_orphans_are_skipped(make_folder, write_image):
    root = make_folder({"a": {"controls": [(32, 32)]}})
    write_image(root / "control_images" / "ghost.png")
    (root / "training_images" / "ghost.txt").write_text("nothing", encoding="utf-8")
    assert [r.key for r in open_records(data(root))] == ["a"]


# --------------------------------------------------------------------------- manifests


def test_csv_manifest(tmp_path, write_image):
    root = tmp_path / "csv"
    for name in ("t1", "t2", "c1", "c1b", "m1"):
        write_image(root / "img" / f"{name}.png", (64, 48))
    (root / "manifest.csv").write_text(
        "target,control,control_1,mask,prompt\n"
        'img/t1.png,img/c1.png,img/c1b.png,img/m1.png,"make it blue, please"\n'
        "img/t2.png,,,,  turn left  \n",
        encoding="utf-8",
    )
    records = open_records(data(root / "manifest.csv"))
    assert [r.key for r in records] == ["t1", "t2"]
    assert records[0].controls == (FileImage(root / "img" / "c1.png"), FileImage(root / "img" / "c1b.png"))
    assert records[0].mask == FileImage(root / "img" / "m1.png")
    assert records[0].prompt == "make it blue, please"
    assert records[1].controls == () and records[1].mask is None
    assert records[1].origin == f"{root / 'manifest.csv'} line 3"
    assert load_sample(records[1], data(root / "manifest.csv")).prompt == "turn left"


def test_jsonl_manifest_with_control_list_key_and_unicode(tmp_path, write_image):
    root = tmp_path / "jsonl"
    for name in ("t", "c0", "c1", "c2"):
        write_image(root / "imgs" / f"{name}.png", (32, 32))
    rows = [
        {
            "key": "first",
            "target": "imgs/t.png",
            "control": ["imgs/c0.png", "imgs/c1.png"],
            "prompt": "把猫变成蓝色 🐱",
        },
        {"key": "second", "target": "imgs/t.png", "control_0": "imgs/c2.png", "prompt": "café"},
    ]
    manifest = root / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    records = open_records(data(manifest, resolution=32))
    assert [r.key for r in records] == ["first", "second"]
    assert [len(r.controls) for r in records] == [2, 1]
    assert load_sample(records[0], data(manifest, resolution=32)).prompt == "把猫变成蓝色 🐱"


def test_manifest_column_mapping(tmp_path, write_image):
    root = tmp_path / "mapped"
    write_image(root / "out.png")
    write_image(root / "in.png")
    (root / "m.csv").write_text("edited,source,instruction\nout.png,in.png,do it\n", encoding="utf-8")
    cfg = data(root / "m.csv", columns={"target": "edited", "control": "source", "prompt": "instruction"})
    (record,) = open_records(cfg)
    assert record.target == FileImage(root / "out.png") and record.controls == (FileImage(root / "in.png"),)
    assert record.prompt == "do it"
    with pytest.raises(DataError, match="no column 'edtied'.*did you mean 'edited'"):
        open_records(data(root / "m.csv", columns={"target": "edtied"}))
    with pytest.raises(DataError, match="no target column"):
        open_records(data(root / "m.csv"))


def test_manifest_escaping_and_missing_paths_are_all_reported(tmp_path, write_image):
    root = tmp_path / "esc"
    write_image(root / "ok.png")
    write_image(tmp_path / "outside.png")
    (root / "m.csv").write_text(
        "target,control,prompt\nok.png,../outside.png,a\nmissing.png,,b\nok.png,,c\n", encoding="utf-8"
    )
    with pytest.raises(DataError) as err:
        open_records(data(root / "m.csv"))
    message = str(err.value)
    assert "../outside.png is outside the dataset folder" in message and "line 2" in message
    assert f"{root / 'missing.png'}: file not found" in message
    assert "2 problem(s)" in message


# --------------------------------------------------------------------------- Hugging Face datasets


def _pil(colour, size=(48, 32)):
    return Image.new("RGB", size, colour)


def test_local_hf_dataset_with_column_mapping(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "input_image": datasets.Image(),
            "edited_image": datasets.Image(),
            "instruction": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "input_image": [_pil((255, 0, 0)), _pil((0, 255, 0), (32, 64)), _pil((0, 0, 255))],
            "edited_image": [_pil((0, 0, 255)), _pil((255, 255, 0), (32, 64)), _pil((0, 255, 255))],
            "instruction": ["make it blue", " turn yellow ", "ünïcödé"],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "hfds"))
    cfg = data(
        f"hf:{tmp_path / 'hfds'}",
        resolution=32,
        columns={"target": "edited_image", "control": "input_image", "prompt": "instruction"},
    )
    records = open_records(cfg)
    assert [r.key for r in records] == ["000000", "000001", "000002"]
    assert records[1].origin.endswith("row 1")
    sample = load_sample(records[1], cfg)
    assert sample.prompt == "turn yellow"
    assert sample.target.getpixel((5, 5)) == (255, 255, 0)
    assert sample.target.size == (16, 48)  # 32x64 at 32*32 px: w = sqrt(512) = 22.6 -> 16, h = 45.3 -> 48
    assert sample.controls[0].getpixel((5, 5)) == (0, 255, 0)
    assert records[0].fingerprint() != records[2].fingerprint()
    assert records[0].fingerprint() == open_records(cfg)[0].fingerprint()

    # a relative hf: path, a DatasetDict with a named split, and dict cells with bytes
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    cfg2 = data("hf:hfdict:test", resolution=32, columns=cfg.columns)
    (only,) = open_records(cfg2, base_dir=tmp_path)
    assert only.prompt == "ünïcödé"
    with pytest.raises(DataError, match="no split 'valid'"):
        open_records(data("hf:hfdict:valid", columns=cfg.columns), base_dir=tmp_path)
    with pytest.raises(DataError, match="no column 'edited'.*edited_image"):
        open_records(data(f"hf:{tmp_path / 'hfds'}", columns={"target": "edited"}))


# --------------------------------------------------------------------------- errors and holdout


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_records(data(tmp_path / "nope"))
    with pytest.raises(DataError, match="unknown scheme 's3:'"):
        open_records(data("s3://bucket/pairs"))
    with pytest.raises(DataError, match="unknown builtin dataset"):
        open_records(data("builtin:circles"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no training_images/ subfolder"):
        open_records(data(tmp_path / "flat"))
    (tmp_path / "empty" / "training_images").mkdir(parents=True)
    with pytest.raises(DataError, match="no samples found"):
        open_records(data(tmp_path / "empty"))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no samples found"):
        open_records(data(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"target": "a.png"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        open_records(data(tmp_path / "bad.jsonl"))


def test_split_holdout():
    records = open_records(DataConfig(path="builtin:shapes", resolution=32, num_samples=10))
    train, hold = split_holdout(records, 3)
    assert len(hold) == 3 and len(train) == 7
    assert {r.key for r in train} | {r.key for r in hold} == {r.key for r in records}
    assert [r.key for r in train] == sorted(r.key for r in train)  # input order kept
    assert [r.key for r in split_holdout(records, 3)[1]] == [r.key for r in hold]  # deterministic
    assert split_holdout(records, 0) == (records, [])
    train, hold = split_holdout(records[:2], 5)
    assert len(train) == 1 and len(hold) == 1
    with pytest.raises(DataError, match="at least 2 samples"):
        split_holdout(records[:1], 1)


def test_fingerprint_tracks_content(make_folder, write_image):
    root = make_folder({"a": {"controls": [(32, 32)]}, "b": {"controls": [(32, 32)]}})
    a, b = open_records(data(root))
    assert len(a.fingerprint()) == 64 and a.fingerprint() != b.fingerprint()  # same images, other prompt
    before = a.fingerprint()
    (root / "training_images" / "a.txt").write_text("  edit a\n", encoding="utf-8")  # whitespace only
    assert open_records(data(root))[0].fingerprint() == before
    write_image(root / "control_images" / "a.png", (32, 32), (1, 2, 3))
    assert open_records(data(root))[0].fingerprint() != before


def test_hf_dict_bytes_path_strings_and_image_lists(tmp_path, write_image):
    import io
    import pickle

    import datasets

    buf = io.BytesIO()
    _pil((10, 20, 30)).save(buf, format="PNG")
    control_file = write_image(tmp_path / "files" / "control.png", (32, 32), (0, 200, 0))
    ds = datasets.Dataset.from_dict(
        {
            "target": [{"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": str(control_file)}],
            "control": [str(control_file), None],
            "refs": [[_pil((1, 1, 1)), _pil((2, 2, 2))], []],
            "prompt": ["a", "b"],
            "key": ["k0", "k1"],
        },
        features=datasets.Features(
            {
                "target": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                "control": datasets.Value("string"),
                "refs": datasets.List(datasets.Image()),
                "prompt": datasets.Value("string"),
                "key": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "mixed"))
    cfg = data(tmp_path / "mixed", resolution=32, columns={"control_1": "refs"})  # a saved dataset, no hf: prefix
    first, second = open_records(cfg)
    assert (first.key, second.key) == ("k0", "k1")
    assert [len(r.controls) for r in (first, second)] == [3, 0]
    sample = load_sample(pickle.loads(pickle.dumps(first)), cfg)  # records survive DataLoader workers
    assert sample.target.getpixel((3, 3)) == (10, 20, 30)
    assert [c.getpixel((3, 3)) for c in sample.controls] == [(0, 200, 0), (1, 1, 1), (2, 2, 2)]
    assert load_sample(second, cfg).target.getpixel((3, 3)) == (0, 200, 0)
