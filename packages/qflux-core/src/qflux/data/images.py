"""Decode image references into normalised PIL images and fit them to a planned size.

- ``open_rgb``: EXIF orientation applied, transparency composited on white, palette / grayscale / 16-bit /
  CMYK / other modes converted to 8-bit RGB.
- ``open_mask``: EXIF orientation applied, mode "L" (white = edited), transparent parts count as not edited.
- ``fit``: center-crop to the target aspect, then LANCZOS resize (no distortion).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from qflux.data.records import ImageRef
from qflux.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Image files that look like images but are not supported (reported by the checks instead of ignored).
OTHER_IMAGE_SUFFIXES = (".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl")

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@contextmanager
def _read_errors(ref: ImageRef, role: str) -> Iterator[None]:
    """Turn a missing file or any decoder failure into a ``DataError`` naming the image and the fix."""
    try:
        yield
    except FileNotFoundError as err:
        raise DataError(f"{ref.describe()}: {role} image not found ({err.strerror or err})") from err
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file the user must fix
        reason = str(err) or type(err).__name__
        raise DataError(
            f"{ref.describe()}: cannot read the {role} image ({reason}); re-export it as PNG/JPEG/WebP or remove it"
        ) from err


def decode(ref: ImageRef, role: str = "image") -> Image.Image:
    """Open and fully decode ``ref`` (truncated or corrupt files fail here), EXIF orientation applied."""
    with _read_errors(ref, role):
        image = ref.open()
        image.load()
        transposed = ImageOps.exif_transpose(image)
        return transposed if transposed is not None else image


def probe_size(ref: ImageRef, role: str = "image") -> tuple[int, int]:
    """``(width, height)`` as ``decode`` would give it (EXIF rotation applied), reading the header only."""
    with _read_errors(ref, role), ref.open() as image:
        w, h = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (and float) images to mode "L", scaling the value range instead of clipping."""
    if image.mode in _SIXTEEN_BIT:
        arr = np.asarray(image).astype(np.float64)
        if image.mode == "I" and arr.size and arr.max() <= 255 and arr.min() >= 0:
            scaled = arr
        else:
            scaled = arr / 257.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if image.mode == "F":
        arr = np.asarray(image).astype(np.float64)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return image


def normalise_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on ``background``."""
    image = to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def open_rgb(ref: ImageRef, role: str = "image") -> Image.Image:
    """Decode ``ref`` as an 8-bit RGB image (see the module docstring)."""
    return normalise_rgb(decode(ref, role))


def open_mask(ref: ImageRef) -> Image.Image:
    """Decode an edit mask as mode "L" (white = edited); transparent areas count as black (not edited)."""
    image = to_8bit(decode(ref, "mask"))
    if image.mode == "L" and "transparency" not in image.info:
        return image
    if image.mode == "1":
        return image.convert("L")
    return normalise_rgb(image, background=(0, 0, 0)).convert("L")


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center-crop ``image`` to the aspect of ``size`` (w, h), then resize to it with LANCZOS."""
    if image.size == tuple(size):
        return image.copy()
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
