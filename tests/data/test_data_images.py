"""Unusual-but-valid images all load: RGBA, palette, grayscale, 1-bit, 16-bit, CMYK, EXIF-rotated JPEG,
WebP, upper-case extensions; unicode prompts; masks in several modes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data import FileImage, check_dataset, load_sample, open_mask, open_records, open_rgb

RED, BLUE = (200, 40, 40), (20, 60, 220)


def _rgba(path):
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    image.save(path)


def _palette(path, transparent: bool):
    image = Image.new("RGB", (32, 32), RED).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    if transparent:
        image.save(path, transparency=0)
    else:
        image.save(path)


def _sixteen_bit(path):
    arr = np.full((32, 32), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    arr[:, 16:] = 65535
    Image.fromarray(arr).save(path)


def _exif_rotated(path):
    image = Image.new("RGB", (64, 32), RED)
    image.paste(BLUE, (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    image.save(path, exif=exif, quality=95)


def _cmyk(path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path)  # red in CMYK


def test_unusual_images_normalise_to_rgb(tmp_path):
    _rgba(tmp_path / "rgba.png")
    out = open_rgb(FileImage(tmp_path / "rgba.png"))
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 255, 255) and out.getpixel((28, 4)) == (255, 0, 0)

    _palette(tmp_path / "pal_t.png", transparent=True)
    assert open_rgb(FileImage(tmp_path / "pal_t.png")).mode == "RGB"
    _palette(tmp_path / "pal.png", transparent=False)
    assert open_rgb(FileImage(tmp_path / "pal.png")).getpixel((3, 3)) == RED

    _sixteen_bit(tmp_path / "gray16.png")
    out = open_rgb(FileImage(tmp_path / "gray16.png"))
    assert out.getpixel((3, 3)) == (128, 128, 128) and out.getpixel((30, 3)) == (255, 255, 255)

    _exif_rotated(tmp_path / "rotated.jpg")
    out = open_rgb(FileImage(tmp_path / "rotated.jpg"))
    assert out.size == (32, 64)  # displayed upright
    top, bottom = np.asarray(out)[8, 16], np.asarray(out)[56, 16]
    assert top[0] > 150 and top[2] < 100  # stored left half (red) is the top once rotated clockwise
    assert bottom[2] > 150 and bottom[0] < 100

    _cmyk(tmp_path / "cmyk.jpg")
    r, g, b = open_rgb(FileImage(tmp_path / "cmyk.jpg")).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60

    Image.new("1", (32, 32), 1).save(tmp_path / "bits.png")
    assert open_rgb(FileImage(tmp_path / "bits.png")).getpixel((1, 1)) == (255, 255, 255)


def test_masks_of_any_mode_become_L(tmp_path):
    Image.new("1", (16, 16), 1).save(tmp_path / "m1.png")
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 8, 16))  # opaque white strokes on transparency
    rgba.save(tmp_path / "m2.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "m3.jpg")
    m1, m2, m3 = (open_mask(FileImage(tmp_path / n)) for n in ("m1.png", "m2.png", "m3.jpg"))
    assert {m.mode for m in (m1, m2, m3)} == {"L"}
    assert m1.getpixel((3, 3)) == 255 and m3.getpixel((3, 3)) > 250
    assert m2.getpixel((3, 3)) == 255 and m2.getpixel((12, 3)) == 0  # transparent = not edited


def test_a_folder_of_unusual_files_loads_and_checks_clean(tmp_path):
    root = tmp_path / "odd"
    train, ctrl = root / "training_images", root / "control_images"
    train.mkdir(parents=True)
    ctrl.mkdir()
    _rgba(train / "rgba.png")
    _palette(train / "palette.png", transparent=True)
    Image.new("L", (32, 48), 90).save(train / "gray.png")
    _sixteen_bit(train / "gray16.png")
    _exif_rotated(train / "rotated.jpg")
    Image.new("RGB", (48, 32), BLUE).save(train / "photo.webp", lossless=True)
    Image.new("RGB", (32, 32), RED).save(train / "upper.PNG")
    _cmyk(train / "cmyk.jpeg")
    for stem in ("rgba", "palette", "gray", "gray16", "rotated", "photo", "upper", "cmyk"):
        (train / f"{stem}.txt").write_text(f"  make the {stem} image blue\n", encoding="utf-8")
        Image.new("RGB", (40, 24), RED).save(ctrl / f"{stem}.webp")
    (train / "upper.txt").write_text("\ufeff  把猫变成蓝色 🐱 — café\n\n", encoding="utf-8")
    # the EXIF-rotated target (displayed 32x64) gets a mask of its displayed size
    Image.new("L", (32, 64), 255).save(ctrl / "rotated_mask.png")

    cfg = DataConfig(path=str(root), resolution=32)
    records = open_records(cfg)
    assert len(records) == 8
    samples = {r.key: load_sample(r, cfg) for r in records}
    for sample in samples.values():
        assert sample.target.mode == "RGB" and all(c.mode == "RGB" for c in sample.controls)
        assert sample.target.size[0] % 16 == 0 and sample.target.size[1] % 16 == 0
    assert samples["upper"].prompt == "把猫变成蓝色 🐱 — café"
    assert samples["rotated"].target.size[1] > samples["rotated"].target.size[0]
    assert samples["rotated"].mask.size == samples["rotated"].target.size
    assert samples["photo"].target.getpixel((4, 4)) == BLUE
    assert check_dataset(cfg) == []
