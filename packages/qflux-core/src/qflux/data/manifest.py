"""CSV / JSONL manifests: one row per sample, columns ``target``, ``control`` (or ``control_0``),
``control_1`` ..., ``mask``, ``prompt`` and optionally ``key`` (``data.columns`` renames them).

Image paths are relative to the manifest's folder, which is the dataset root: a path that leaves it
(``../x.png``, an absolute path elsewhere) is an error, as is a file that does not exist. In JSONL a control
cell may also be a list of paths (several controls). Rows keep the manifest's order. A sample's key is the
``key`` column, else the target's stem (``stem~ROW`` when two rows share a stem).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from qflux.config.schema import DataConfig
from qflux.data.columns import ColumnMap
from qflux.data.records import DataProblem, FileImage, SampleRecord, SourceScan
from qflux.errors import DataError

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """``(columns, [(line number, row), ...])``; malformed content becomes a ``DataError`` naming the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text; re-save the manifest as UTF-8") from err
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path} line {reader.line_num}: more cells than header columns")
                if any((v or "").strip() for v in row.values()):
                    rows.append((reader.line_num, {k.strip(): v for k, v in row.items()}))
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: invalid CSV ({err})") from err
        return [c.strip() for c in reader.fieldnames or []], rows
    columns: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg}); one JSON object per line") from err
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        if "control_0" in row:  # control and control_0 name one slot; rows may use either
            if "control" in row:
                raise DataError(f"{path} line {number}: has both 'control' and 'control_0'; keep one")
            row = {("control" if k == "control_0" else k): v for k, v in row.items()}
        columns.update(dict.fromkeys(row))
        rows.append((number, row))
    return list(columns), rows


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` stays under ``root`` once ``..`` parts are collapsed (symlinks are not followed)."""
    root_n = os.path.normpath(os.path.abspath(root))
    path_n = os.path.normpath(os.path.abspath(path))
    return path_n == root_n or path_n.startswith(root_n.rstrip(os.sep) + os.sep)


def scan_manifest(path: Path, data: DataConfig) -> SourceScan:
    """Read every row of the manifest at ``path`` (see the module docstring)."""
    root = path.parent
    scan = SourceScan(description=f"manifest {path}")
    names, rows = read_manifest(path)
    if not rows:
        return scan
    columns = ColumnMap.resolve(data.columns, names, str(path))
    used_keys: dict[str, int] = {}

    for number, row in rows:
        where = f"{path} line {number}"
        problems: list[DataProblem] = []

        def image(
            value: Any, column: str, problems: list[DataProblem] = problems, where: str = where
        ) -> FileImage | None:
            if value is None or (isinstance(value, str) and not value.strip()):
                return None
            if not isinstance(value, str):
                problems.append(DataProblem(where, f"column '{column}': expected a path, got {value!r}"))
                return None
            text = value.strip()
            if "://" in text:
                problems.append(
                    DataProblem(
                        where,
                        f"column '{column}': URLs are not supported ({text}); download the file next to the manifest",
                    )
                )
                return None
            file = root / Path(text).expanduser()
            if not inside(root, file):
                problems.append(
                    DataProblem(
                        where, f"column '{column}': {text} is outside the dataset folder {root}; move it inside"
                    )
                )
                return None
            if not file.is_file():
                problems.append(DataProblem(str(file), f"file not found (column '{column}' of {where})"))
                return None
            return FileImage(file)

        target = image(row.get(columns.target), columns.target)
        if target is None and not problems:
            problems.append(DataProblem(where, f"no target image (column '{columns.target}' is empty)"))
        controls: list[FileImage] = []
        for column in columns.controls:
            values = row.get(column)
            for value in values if isinstance(values, list) else [values]:
                ref = image(value, column)
                if ref is not None:
                    controls.append(ref)
        mask = image(row.get(columns.mask), columns.mask) if columns.mask else None
        prompt_value = row.get(columns.prompt) if columns.prompt else None
        prompt = None if prompt_value is None else str(prompt_value)
        if problems:
            scan.errors.extend(problems)
            continue
        if prompt is None or not prompt.strip():
            scan.warnings.append(
                DataProblem(
                    where, "empty prompt" if columns.prompt else "missing prompt: the manifest has no 'prompt' column"
                )
            )
        assert target is not None
        key_value = row.get(columns.key) if columns.key else None
        key = str(key_value).strip() if key_value not in (None, "") else target.path.stem
        if key in used_keys:
            key = f"{key}~{number}"
        used_keys[key] = number
        scan.records.append(
            SampleRecord(key=key, prompt=prompt, target=target, controls=tuple(controls), mask=mask, origin=where)
        )
    return scan
