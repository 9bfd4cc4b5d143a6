"""Hugging Face ``datasets``: ``hf:OWNER/NAME[:split]`` (hub) or ``hf:PATH[:split]`` (local).

A local path may be a folder written by ``save_to_disk`` (``Dataset`` or ``DatasetDict``), a folder
``datasets.load_dataset`` understands (parquet files, an image folder ...) or a ``.parquet`` / ``.arrow`` file.
The split defaults to ``train`` (or the only split). Columns are mapped with ``data.columns`` (see
``qflux.data.columns``); image cells may be PIL images, ``{"bytes", "path"}`` dicts, bytes or paths, and a
control cell may hold a list of images. Images are read lazily (``DatasetCell``), never copied into memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qflux.config.schema import DataConfig
from qflux.data.columns import ColumnMap
from qflux.data.records import DataProblem, DatasetCell, SampleRecord, SourceScan, image_ref_from_value
from qflux.errors import DataError

SAVED_MARKERS = ("dataset_dict.json", "state.json")


def parse_spec(spec: str, base_dir: Path) -> tuple[str, Path | None, str | None]:
    """``"OWNER/NAME:split"`` -> ``(name, local path or None, split or None)``; local paths win over hub ids."""
    candidates = [(spec, None)]
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        candidates.append((head, tail))
    for name, split in candidates:
        local = (base_dir / Path(name).expanduser()) if name else None
        if local is not None and local.exists():
            return name, local, split
    name, split = candidates[-1]
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"data.path hf:{spec}: the local dataset {base_dir / name} does not exist")
    return name, None, split


def is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).is_file() for m in SAVED_MARKERS)


def load_hf(spec: str, base_dir: Path) -> tuple[Any, str, Path | None]:
    """Load the split ``spec`` names: ``(datasets.Dataset, label for messages, root for relative paths)``."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - a dependency of qflux-core
        raise DataError("hf: datasets need the 'datasets' package: pip install datasets") from err

    name, local, split = parse_spec(spec, base_dir)
    label = f"hf:{name}" + (f":{split}" if split else "")
    try:
        if local is not None and is_saved_dataset(local):
            loaded = datasets.load_from_disk(str(local))
        elif local is not None and local.is_file():
            kind = {".parquet": "parquet", ".arrow": "arrow"}.get(local.suffix.lower())
            if kind is None:
                raise DataError(f"data.path {label}: unsupported file type '{local.suffix}' (use .parquet or .arrow)")
            loaded = datasets.load_dataset(kind, data_files=str(local))
        else:
            loaded = datasets.load_dataset(str(local) if local is not None else name)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - network, auth, format: all user-fixable
        where = "the local dataset" if local is not None else "the hub dataset"
        raise DataError(
            f"data.path {label}: could not load {where} ({type(err).__name__}: {err}); check the name or path, "
            "your network / `huggingface-cli login` for hub datasets"
        ) from err
    dataset = _pick_split(loaded, split, label)
    root = local if local is not None and local.is_dir() else (local.parent if local is not None else None)
    return dataset, label, root


def _pick_split(loaded: Any, split: str | None, label: str) -> Any:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        splits = list(loaded)
        if split is None:
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise DataError(f"data.path {label}: choose a split with {label}:SPLIT (splits: {', '.join(splits)})")
        if split not in loaded:
            raise DataError(f"data.path {label}: no split '{split}' (splits: {', '.join(splits) or 'none'})")
        return loaded[split]
    if split is not None and loaded.split is not None and str(loaded.split) != split:
        raise DataError(f"data.path {label}: the dataset holds split '{loaded.split}', not '{split}'")
    return loaded


def _without_decoding(dataset: Any, columns: list[str]) -> Any:
    """Cast image columns (and lists of images) to ``decode=False`` so that reading a row decodes nothing."""
    import datasets

    for column in columns:
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def scan_hf(spec: str, data: DataConfig, base_dir: Path) -> SourceScan:
    """Every row of the dataset ``spec`` as a record whose images are ``DatasetCell`` references."""
    dataset, label, root = load_hf(spec, base_dir)
    scan = SourceScan(description=f"dataset {label}")
    columns = ColumnMap.resolve(data.columns, list(dataset.column_names), label)
    image_columns = [columns.target, *columns.controls, *([columns.mask] if columns.mask else [])]
    used = [*image_columns, *(c for c in (columns.prompt, columns.key) if c)]
    dataset = _without_decoding(dataset.select_columns(list(dict.fromkeys(used))), image_columns)
    if columns.prompt is None:
        scan.warnings.append(
            DataProblem(label, "missing prompt: no 'prompt' column; map one with data.columns.prompt=COLUMN")
        )
    used_keys: set[str] = set()
    for row_index, row in enumerate(dataset):
        where = f"{label} row {row_index}"
        problems: list[DataProblem] = []

        def cell(
            column: str,
            item: int | None = None,
            value: Any = None,
            where: str = where,
            row_index: int = row_index,
            problems: list[DataProblem] = problems,
        ) -> DatasetCell | None:
            try:
                ref = image_ref_from_value(value, where, root)
            except TypeError as err:
                problems.append(DataProblem(where, f"column '{column}': {err}"))
                return None
            if ref is None:
                return None
            name = f"{where} {column}" + (f"[{item}]" if item is not None else "")
            return DatasetCell(dataset, row_index, column, name, item, root)

        target = cell(columns.target, value=row[columns.target])
        if target is None and not problems:
            problems.append(DataProblem(where, f"no target image (column '{columns.target}' is empty)"))
        controls: list[DatasetCell] = []
        for column in columns.controls:
            value = row[column]
            items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
            for item, v in items:
                ref = cell(column, item, v)
                if ref is not None:
                    controls.append(ref)
        mask = cell(columns.mask, value=row[columns.mask]) if columns.mask else None
        if problems:
            scan.errors.extend(problems)
            continue
        prompt_value = row[columns.prompt] if columns.prompt else None
        if isinstance(prompt_value, (list, tuple)):  # several captions: the first non-empty one
            prompt_value = next((p for p in prompt_value if p and str(p).strip()), None)
        prompt = None if prompt_value is None else str(prompt_value)
        if columns.prompt and (prompt is None or not prompt.strip()):
            scan.warnings.append(DataProblem(where, "empty prompt"))
        key = str(row[columns.key]) if columns.key and row[columns.key] not in (None, "") else f"{row_index:06d}"
        if key in used_keys:
            key = f"{key}~{row_index}"
        used_keys.add(key)
        scan.records.append(
            SampleRecord(key=key, prompt=prompt, target=target, controls=tuple(controls), mask=mask, origin=where)
        )
    return scan
