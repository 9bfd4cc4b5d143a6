"""``open_records``: the records of the dataset ``data.path`` names, and ``split_holdout``.

``data.path`` forms: a folder (``qflux.data.folder``: the training_images/ + control_images/ layout, or with
``data.control_path`` set the folder of targets of the separate-folders layout), a ``.csv`` / ``.jsonl`` manifest
(``qflux.data.manifest``), ``hf:OWNER/NAME[:split]`` or ``hf:PATH[:split]`` (``qflux.data.hf``, a folder saved
with ``save_to_disk`` is also recognised without the prefix) and ``builtin:shapes`` / ``builtin:shapes-pink``
(``qflux.data.shapes``).
``data.mask_path`` adds a folder of masks to either folder layout. A relative path (``data.path``,
``data.control_path``, ``data.mask_path``) is resolved against ``base_dir`` (default: the current directory).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from qflux.config.schema import DataConfig
from qflux.data.folder import (
    CONTROL_DIR,
    TARGET_DIR,
    guess_control_folders,
    is_folder_dataset,
    scan_folder,
    scan_separate,
)
from qflux.data.hf import is_saved_dataset, scan_hf
from qflux.data.manifest import MANIFEST_SUFFIXES, is_manifest, scan_manifest
from qflux.data.records import DataProblem, SampleRecord, SourceScan
from qflux.data.shapes import dataset_names, shapes_records
from qflux.errors import DataError

log = logging.getLogger("qflux.data")

BUILTINS = dataset_names()  # shapes, shapes-pink
_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):")
FORMS = "a folder with training_images/, a .csv/.jsonl manifest, hf:OWNER/NAME[:split], hf:PATH or builtin:shapes"
MAX_LISTED = 20
_MANIFEST_HINT = "add a 'control' column with the image before the edit (or map one with data.columns: {control: NAME})"
_HF_HINT = "map the dataset's column of images before the edit with data.columns (e.g. {control: input_image})"


def _folder_key(key: str, value: str, base: Path) -> Path:
    """The folder a ``data.control_path`` / ``data.mask_path`` entry names; ``DataError`` when it is none."""
    path = base / Path(value).expanduser()
    if not value.strip() or not path.exists():
        raise DataError(f"{key} {value}: not found (looked at {path}); set {key} to a folder of images named "
                        "like the targets")
    if not path.is_dir():
        raise DataError(f"{key} {value}: is a file, not a folder; set {key} to a folder of images named like "
                        "the targets")
    return path


def _extra_folders(data: DataConfig, base: Path) -> tuple[list[Path], Path | None]:
    """``(control folders, mask folder)`` of ``data.control_path`` / ``data.mask_path``."""
    value = data.control_path
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    if isinstance(value, list) and not value:
        raise DataError("data.control_path is an empty list; name one folder per control, or remove the key")
    keys = ["data.control_path"] if isinstance(value, str) else [f"data.control_path[{i}]" for i in range(len(values))]
    controls = [_folder_key(k, v, base) for k, v in zip(keys, values, strict=True)]
    mask = _folder_key("data.mask_path", data.mask_path, base) if data.mask_path is not None else None
    return controls, mask


def _not_a_folder_source(data: DataConfig, spec: str) -> None:
    """``data.control_path`` / ``data.mask_path`` name folders of a folder dataset only."""
    for key in ("control_path", "mask_path"):
        if getattr(data, key) is not None:
            raise DataError(f"data.{key} works with a folder data.path (the folder of target images); "
                            f"{spec} names its images itself (a manifest's or dataset's columns): remove data.{key}")


def _with_hint(scan: SourceScan, hint: str) -> SourceScan:
    if not scan.control_hint:
        scan.control_hint = hint
    return scan


def scan_dataset(data: DataConfig, base_dir: Path | None = None) -> SourceScan:
    """Dispatch on ``data.path`` and scan the source; ``DataError`` for a missing path or unknown scheme."""
    spec = data.path.strip()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not spec:
        raise DataError(f"data.path is empty; set it to {FORMS}")
    match = _SCHEME_RE.match(spec)
    if match and match["scheme"] == "builtin":
        name = spec[len("builtin:") :]
        if name not in BUILTINS:
            raise DataError(
                f"data.path {spec}: unknown builtin dataset (available: builtin:{', builtin:'.join(BUILTINS)})"
            )
        _not_a_folder_source(data, spec)
        return SourceScan(records=shapes_records(data, name), description=spec)
    if match and match["scheme"] == "hf":
        rest = spec[len("hf:") :]
        if not rest:
            raise DataError("data.path hf: needs a dataset, e.g. hf:OWNER/NAME, hf:OWNER/NAME:train or hf:./local_dir")
        _not_a_folder_source(data, spec)
        return _with_hint(scan_hf(rest, data, base), _HF_HINT)

    path = base / Path(spec).expanduser()
    if match and not path.exists():
        raise DataError(f"data.path {spec}: unknown scheme '{match['scheme']}:'; use {FORMS}")
    if not path.exists():
        raise DataError(f"data.path {spec}: not found (looked at {path}); set data.path to {FORMS}")
    if path.is_dir():
        if not is_folder_dataset(path) and is_saved_dataset(path):
            _not_a_folder_source(data, spec)
            return _with_hint(scan_hf(str(path), data, base), _HF_HINT)
        if data.control_path is not None:
            controls, masks = _extra_folders(data, base)
            if is_folder_dataset(path):
                raise DataError(
                    f"data.path {spec} holds {TARGET_DIR}/: with data.control_path set, data.path is the folder "
                    f"of the target images itself (set data.path to {Path(spec) / TARGET_DIR}), or remove "
                    f"data.control_path to read {TARGET_DIR}/ + {CONTROL_DIR}/"
                )
            return scan_separate(path, controls, masks)
        if is_folder_dataset(path):
            return scan_folder(path, _extra_folders(data, base)[1])
        guess = guess_control_folders(path)
        raise DataError(
            f"data.path {spec}: the folder has no {TARGET_DIR}/ subfolder; expected {TARGET_DIR}/<stem>.png + "
            f"<stem>.txt and optionally {CONTROL_DIR}/<stem>.png (see docs/data.md), or point data.path to a "
            "manifest; for a folder of targets + .txt captions with the controls in another folder (ai-toolkit's "
            "folder_path + control_path, musubi-tuner's image_directory + control_directory) set "
            "data.control_path to the control folder"
            + (f" (probably {guess[0]}: its images are named like the targets)" if guess else "")
        )
    _not_a_folder_source(data, spec)
    if is_manifest(path):
        return _with_hint(scan_manifest(path, data), _MANIFEST_HINT)
    raise DataError(
        f"data.path {spec}: unsupported file type '{path.suffix}' (manifests: {', '.join(MANIFEST_SUFFIXES)})"
    )


def empty_folder_hint(data: DataConfig) -> str:
    """How to add a sample to an empty folder dataset (either layout)."""
    if data.control_path is not None:
        return f"add <stem>.png with <stem>.txt to {data.path}, and the controls <stem>.png to data.control_path"
    return f"add {TARGET_DIR}/<stem>.png with {TARGET_DIR}/<stem>.txt"


def format_problems(problems: Sequence[DataProblem], limit: int = MAX_LISTED) -> str:
    lines = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (run `qflux data check --config FILE` for all)")
    return "\n".join(lines)


def open_records(data: DataConfig, base_dir: Path | None = None) -> list[SampleRecord]:
    """Every usable sample of ``data.path``, in a deterministic order.

    Raises ``DataError`` when the path is missing or of an unknown kind, when the dataset is empty, and when
    the source is ambiguous or invalid (duplicate stems, manifest paths outside the dataset or missing):
    the message lists every such problem. Skipped files and empty prompts are logged as warnings.
    """
    scan = scan_dataset(data, base_dir)
    if scan.errors:
        raise DataError(f"{scan.description}: {len(scan.errors)} problem(s)\n{format_problems(scan.errors)}")
    if scan.warnings:
        log.warning("%s: %d warning(s)\n%s", scan.description, len(scan.warnings), format_problems(scan.warnings))
    if not scan.records:
        raise DataError(
            f"{scan.description}: no samples found; "
            + (
                empty_folder_hint(data)
                if scan.description.startswith("folder")
                else "add rows with a target image"
            )
        )
    return scan.records


def split_holdout(records: Sequence[SampleRecord], n: int) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """``(train, holdout)``: ``n`` samples (at most all but one) kept out, chosen by a hash of their key.

    Deterministic and stable: adding samples rarely moves existing ones between the two sides. Both keep the
    input order. ``n > 0`` with fewer than 2 records is a ``DataError``.
    """
    records = list(records)
    if n <= 0:
        return records, []
    if len(records) < 2:
        raise DataError(f"data.holdout={n} needs at least 2 samples, the dataset has {len(records)}")
    if n >= len(records):
        log.warning("data.holdout=%d but the dataset has %d samples: holding out %d", n, len(records), len(records) - 1)
        n = len(records) - 1

    def rank(i: int) -> tuple[str, int]:
        return hashlib.sha256(records[i].key.encode("utf-8")).hexdigest(), i

    held = set(sorted(range(len(records)), key=rank)[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
