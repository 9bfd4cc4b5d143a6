"""What a dataset is made of before decoding: image references, ``SampleRecord`` and ``DataProblem``.

An image reference says where an image's bytes are without decoding them: a file (``FileImage``), bytes in
memory (``BytesImage``), an in-memory PIL image (``MemoryImage``: ``builtin:shapes``) or one cell of a
Hugging Face dataset read on demand (``DatasetCell``: large datasets are never copied into memory).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

FINGERPRINT_VERSION = b"qflux-sample-v1"


@dataclass(frozen=True)
class FileImage:
    """An image file on disk."""

    path: Path

    @property
    def file(self) -> Path | None:
        return self.path

    def describe(self) -> str:
        return str(self.path)

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def open(self) -> Image:
        from PIL import Image as PILImage

        return PILImage.open(self.path)


@dataclass(frozen=True, eq=False)
class BytesImage:
    """Encoded image bytes held in memory (e.g. a Hugging Face image cell)."""

    data: bytes
    label: str

    @property
    def file(self) -> Path | None:
        return None

    def describe(self) -> str:
        return self.label

    def read_bytes(self) -> bytes:
        return self.data

    def open(self) -> Image:
        from PIL import Image as PILImage

        return PILImage.open(io.BytesIO(self.data))


@dataclass(frozen=True, eq=False)
class MemoryImage:
    """A decoded PIL image held in memory; its bytes (for fingerprints) are mode, size and pixels."""

    image: Image
    label: str

    @property
    def file(self) -> Path | None:
        return None

    def describe(self) -> str:
        return self.label

    def read_bytes(self) -> bytes:
        header = f"{self.image.mode}:{self.image.size[0]}x{self.image.size[1]}:".encode()
        return header + self.image.tobytes()

    def open(self) -> Image:
        return self.image.copy()


@dataclass(frozen=True, eq=False)
class DatasetCell:
    """One image in a Hugging Face dataset row, read when needed.

    ``item`` is the position inside a list-valued cell (several controls in one column), else None.
    ``root`` resolves relative path values of local datasets.
    """

    dataset: Any  # datasets.Dataset with image columns cast to decode=False
    row: int
    column: str
    label: str
    item: int | None = None
    root: Path | None = None

    @property
    def file(self) -> Path | None:
        return None

    def describe(self) -> str:
        return self.label

    def resolve(self) -> FileImage | BytesImage | MemoryImage:
        value = self.dataset[self.row][self.column]
        if self.item is not None:
            value = value[self.item]
        ref = image_ref_from_value(value, self.label, self.root)
        if ref is None:
            raise ValueError(f"{self.label}: the cell is empty")
        return ref

    def read_bytes(self) -> bytes:
        return self.resolve().read_bytes()

    def open(self) -> Image:
        return self.resolve().open()


ImageRef = FileImage | BytesImage | MemoryImage | DatasetCell


def image_ref_from_value(
    value: Any, label: str, root: Path | None = None
) -> FileImage | BytesImage | MemoryImage | None:
    """Turn a table cell (PIL image, ``{"bytes", "path"}`` dict, bytes, path string, array) into a reference.

    None for an empty cell; ``TypeError`` for a value that is no image.
    """
    from PIL import Image as PILImage

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, PILImage.Image):
        return MemoryImage(value, label)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BytesImage(bytes(value), label)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return BytesImage(bytes(value["bytes"]), label)
        if value.get("path"):
            return image_ref_from_value(str(value["path"]), label, root)
        return None
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        return FileImage(path)
    if hasattr(value, "__array__"):
        import numpy as np

        return MemoryImage(PILImage.fromarray(np.asarray(value)), label)
    raise TypeError(f"{label}: expected an image, bytes or a path, got {type(value).__name__}")


@dataclass(frozen=True)
class SampleRecord:
    """One training example before decoding.

    ``target`` is None only for inference requests (a dataset source never yields such a record).
    ``controls`` is empty for a text-to-image sample. ``origin`` names the file or row for messages.
    ``prompt`` is the raw text (``load_sample`` strips it); None when the sample has no prompt.
    """

    key: str
    prompt: str | None
    target: ImageRef | None
    controls: tuple[ImageRef, ...] = ()
    mask: ImageRef | None = None
    origin: str = ""
    prompt_file: Path | None = None  # the .txt the prompt came from (folder layout)
    # ``fingerprint()`` once computed: preflight, the cache and the run ask for it several times per record
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def images(self) -> list[tuple[str, ImageRef]]:
        """``(role, ref)`` for every input image: "target", "control", "control_1", ..., "mask"."""
        out: list[tuple[str, ImageRef]] = []
        if self.target is not None:
            out.append(("target", self.target))
        for i, ref in enumerate(self.controls):
            out.append(("control" if i == 0 else f"control_{i}", ref))
        if self.mask is not None:
            out.append(("mask", self.mask))
        return out

    @property
    def files(self) -> tuple[Path, ...]:
        """The files on disk this sample comes from (images and prompt file)."""
        paths = [ref.file for _, ref in self.images if ref.file is not None]
        if self.prompt_file is not None:
            paths.append(self.prompt_file)
        return tuple(paths)

    def fingerprint(self) -> str:
        """sha256 (hex) of every input's bytes and the stripped prompt: changes when any input changes.

        Roles are hashed with the content, so moving an image from control to target changes it too. Computed
        once per record object (one read of its bytes per run, not one per caller).
        """
        if self._fingerprint is None:
            object.__setattr__(self, "_fingerprint", self._hash())
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.sha256(FINGERPRINT_VERSION)

        def part(tag: str, payload: bytes) -> None:
            h.update(tag.encode() + b"\0" + len(payload).to_bytes(8, "little"))
            h.update(payload)

        if self.prompt is None:
            part("prompt:none", b"")
        else:
            part("prompt", self.prompt.strip().encode("utf-8"))
        for role, ref in self.images:
            part(role, ref.read_bytes())
        return h.hexdigest()


@dataclass(frozen=True)
class DataProblem:
    """One bad sample or file: ``file`` names it (a path, or a manifest line / dataset row), ``reason`` says
    what is wrong and how to fix it."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class UnreadFolder:
    """A folder next to a dataset that its layout does not read but that holds images: ``matching`` of its
    ``images`` are named like the dataset's targets (a misnamed control or mask folder)."""

    path: Path
    images: int
    matching: int


@dataclass
class SourceScan:
    """What a source found: usable records, ``errors`` that make the dataset ambiguous or invalid
    (``open_records`` refuses to continue), ``warnings`` about files that belong to no sample (fatal before a
    run), ``skipped``: files and folders that are not read, with the reason (reported, not fatal), and
    ``unread``: folders near the dataset holding images (the first place to look when no sample has a control).
    ``control_hint`` says how a control is added in this source (for the "no sample has a control" message)."""

    records: list[SampleRecord] = field(default_factory=list)
    errors: list[DataProblem] = field(default_factory=list)
    warnings: list[DataProblem] = field(default_factory=list)
    description: str = ""  # e.g. "folder data/pairs"
    skipped: list[DataProblem] = field(default_factory=list)
    unread: list[UnreadFolder] = field(default_factory=list)
    control_hint: str = ""
