"""``open_records``: the records of the dataset ``data.path`` names, and ``split_holdout``.

``data.path`` forms: a folder (``qflux.data.folder``), a ``.csv`` / ``.jsonl`` manifest
(``qflux.data.manifest``), ``hf:OWNER/NAME[:split]`` or ``hf:PATH[:split]`` (``qflux.data.hf``, a folder saved
with ``save_to_disk`` is also recognised without the prefix) and ``builtin:shapes`` (``qflux.data.shapes``).
A relative path is resolved against ``base_dir`` (default: the current directory).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from qflux.config.schema import DataConfig
from qflux.data.folder import CONTROL_DIR, TARGET_DIR, is_folder_dataset, scan_folder
from qflux.data.hf import is_saved_dataset, scan_hf
from qflux.data.manifest import MANIFEST_SUFFIXES, is_manifest, scan_manifest
from qflux.data.records import DataProblem, SampleRecord, SourceScan
from qflux.data.shapes import shapes_records
from qflux.errors import DataError

log = logging.getLogger("qflux.data")

BUILTINS = ("shapes",)
_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):")
FORMS = "a folder with training_images/, a .csv/.jsonl manifest, hf:OWNER/NAME[:split], hf:PATH or builtin:shapes"
MAX_LISTED = 20


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
        return SourceScan(records=shapes_records(data), description=spec)
    if match and match["scheme"] == "hf":
        rest = spec[len("hf:") :]
        if not rest:
            raise DataError("data.path hf: needs a dataset, e.g. hf:OWNER/NAME, hf:OWNER/NAME:train or hf:./local_dir")
        return scan_hf(rest, data, base)

    path = base / Path(spec).expanduser()
    if match and not path.exists():
        raise DataError(f"data.path {spec}: unknown scheme '{match['scheme']}:'; use {FORMS}")
    if not path.exists():
        raise DataError(f"data.path {spec}: not found (looked at {path}); set data.path to {FORMS}")
    if path.is_dir():
        if is_folder_dataset(path):
            return scan_folder(path)
        if is_saved_dataset(path):
            return scan_hf(str(path), data, base)
        raise DataError(
            f"data.path {spec}: the folder has no {TARGET_DIR}/ subfolder; expected {TARGET_DIR}/<stem>.png + "
            f"<stem>.txt and optionally {CONTROL_DIR}/<stem>.png (see the docs), or point data.path to a manifest"
        )
    if is_manifest(path):
        return scan_manifest(path, data)
    raise DataError(
        f"data.path {spec}: unsupported file type '{path.suffix}' (manifests: {', '.join(MANIFEST_SUFFIXES)})"
    )


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
                f"add {TARGET_DIR}/<stem>.png with {TARGET_DIR}/<stem>.txt"
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
