"""``check_dataset``: report every bad sample of a dataset before a long run.

What is reported (each as ``DataProblem(file, reason)``):

- from the source scan: duplicate stems (``a.png`` and ``a.jpg``), missing or empty prompts, files without a
  target, unsupported image types, manifest paths missing or outside the dataset, control numbering gaps;
- per sample: unreadable or truncated images (every image is fully decoded), extreme aspect ratios
  (longer / shorter side above ``data.max_aspect``), a mask whose size differs from the target's;
- across samples: a sample with fewer controls than most samples have (a forgotten control image silently
  makes a text-to-image sample), and, when ``max_controls`` is given (the trainer's limit), more than that.

``validate_dataset`` is the same check made fatal: ``qflux train`` and ``qflux cache`` run it before they write
anything (docs/errors.md, "Bad samples: validated upfront").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from qflux.config.schema import DataConfig
from qflux.data.images import open_mask, open_rgb, probe_size
from qflux.data.records import DataProblem, ImageRef, SampleRecord, SourceScan
from qflux.data.sources import format_problems, scan_dataset
from qflux.errors import DataError

EMPTY_HINT = "add training_images/<stem>.png with training_images/<stem>.txt (or rows to the manifest)"
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class DataReport:
    """The result of a check: how many samples were found and every problem."""

    samples: int
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _where(ref: ImageRef) -> str:
    return ref.describe()


def check_record(record: SampleRecord, data: DataConfig, decode: bool = True) -> list[DataProblem]:
    """Decode every image of one record and report what is wrong with it. ``decode=False`` reads only the
    image headers (sizes): for records already known to decode, e.g. with a verified cache entry."""
    problems: list[DataProblem] = []
    target_size = None
    for role, ref in record.images:
        try:
            if decode:
                size = (open_mask(ref) if role == "mask" else open_rgb(ref, role)).size
            else:
                size = probe_size(ref, role)
        except DataError as err:
            reason = str(err)
            prefix = f"{ref.describe()}: "
            problems.append(DataProblem(_where(ref), reason[len(prefix) :] if reason.startswith(prefix) else reason))
            continue
        w, h = size
        if role == "target":
            target_size = size
        if role == "mask":
            if target_size is not None and size != target_size:
                problems.append(
                    DataProblem(
                        _where(ref),
                        f"mask is {w}x{h} but the target is {target_size[0]}x{target_size[1]}; "
                        "make the mask the target's size",
                    )
                )
            continue
        aspect = max(w, h) / max(1, min(w, h))
        if aspect > data.max_aspect:
            problems.append(
                DataProblem(
                    _where(ref),
                    f"extreme aspect ratio {w}x{h} ({aspect:.1f}:1 > data.max_aspect {data.max_aspect:g}); "
                    "crop the image or raise data.max_aspect",
                )
            )
    return problems


def control_count_problems(records: list[SampleRecord], max_controls: int | None = None) -> list[DataProblem]:
    """Samples with fewer controls than the most common count, and (given ``max_controls``) more than that."""
    problems: list[DataProblem] = []
    counts = Counter(len(r.controls) for r in records)
    if not counts:
        return problems
    usual = max(counts, key=lambda c: (counts[c], c))
    for r in records:
        n = len(r.controls)
        if n < usual:
            problems.append(
                DataProblem(
                    r.origin,
                    f"'{r.key}' has {n} control image(s) while {counts[usual]} of {len(records)} samples have "
                    f"{usual}; add the missing control image(s)",
                )
            )
        if max_controls is not None and n > max_controls:
            problems.append(
                DataProblem(
                    r.origin,
                    f"'{r.key}' has {n} control images but the trainer takes at most {max_controls}",
                )
            )
    return problems


def _map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    if workers <= 0:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
        return list(pool.map(fn, items))


def _inspect(data: DataConfig, base_dir: Path | None, max_controls: int | None,
             decoded: Callable[[SampleRecord], bool] | None = None) -> tuple[SourceScan, list[DataProblem]]:
    scan = scan_dataset(data, base_dir)
    if not scan.records and not scan.errors and not scan.warnings:
        raise DataError(f"{scan.description}: no samples found; {EMPTY_HINT}")
    problems = [*scan.errors, *scan.warnings]

    def one(record: SampleRecord) -> list[DataProblem]:
        return check_record(record, data, decode=not (decoded is not None and decoded(record)))

    for found in _map(one, scan.records, data.workers):
        problems.extend(found)
    problems.extend(control_count_problems(scan.records, max_controls))
    unique = list(dict.fromkeys(problems))
    unique.sort(key=lambda p: (p.file, p.reason))
    return scan, unique


def inspect_dataset(data: DataConfig, base_dir: Path | None = None, max_controls: int | None = None) -> DataReport:
    """Scan and decode the whole dataset; ``DataError`` only when it cannot be opened at all (missing path,
    unknown scheme, unreadable manifest) or holds nothing."""
    scan, problems = _inspect(data, base_dir, max_controls)
    return DataReport(samples=len(scan.records), problems=problems)


def validate_dataset(data: DataConfig, base_dir: Path | None = None, max_controls: int | None = None,
                     decoded: Callable[[SampleRecord], bool] | None = None) -> list[SampleRecord]:
    """The check ``qflux train`` and ``qflux cache`` run before they write anything: every problem that
    ``qflux data check`` reports is fatal here, and one ``DataError`` lists them all (the first
    ``MAX_LISTED``), so a run never stops on a bad sample after hours of work. Returns the records.

    ``decoded(record)`` True means the record's images are known to decode (a verified cache entry holds the
    encoding of these exact bytes): only their headers are read, so a run with a full cache pays no decoding.
    """
    scan, problems = _inspect(data, base_dir, max_controls, decoded)
    if problems:
        files = len({p.file for p in problems})
        raise DataError(
            f"{scan.description}: {len(problems)} problem(s) in {files} file(s); fix or remove these samples, "
            f"then run again (`qflux data check --config FILE` lists every problem):\n{format_problems(problems)}"
        )
    if not scan.records:
        raise DataError(f"{scan.description}: no samples found; {EMPTY_HINT}")
    return scan.records


def check_dataset(data: DataConfig, base_dir: Path | None = None, max_controls: int | None = None) -> list[DataProblem]:
    """Every problem of the dataset ``data.path`` names (empty list: clean); see the module docstring."""
    return inspect_dataset(data, base_dir, max_controls).problems
