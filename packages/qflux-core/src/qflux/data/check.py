"""``inspect_dataset``: what a dataset holds and every bad sample, before a long run.

``DataReport`` is what ``qflux data check`` prints: the facts (samples, how many with 0/1/N controls, masks,
planned sizes or buckets, samples held out), the ``problems`` (each fatal before a run), ``warnings`` (loud but
not fatal) and what was ``skipped`` with the reason. A new measurement adds a field to ``DataReport``, fills it
in ``_summarise`` and adds its line in ``DataReport.lines`` (or appends a ``ReportLine`` to ``notes``).

Problems (each a ``DataProblem(file, reason)``):

- from the source scan: duplicate stems (``a.png`` and ``a.jpg``), missing or empty prompts (pointing at a
  caption put among the controls), files without a target, unsupported image types, manifest paths missing
  or outside the dataset, control numbering gaps;
- per sample: unreadable or truncated images (every image is fully decoded), extreme aspect ratios
  (longer / shorter side above ``data.max_aspect``), a mask whose size differs from the target's, a mask that
  is all black or holds only the values 0 and 1 (it looks black: no edited region);
- across samples: a sample with fewer controls than most samples have (a forgotten control image silently
  makes a text-to-image sample), more than ``max_controls`` (the trainer's limit), a sample without a mask
  while most samples have one, and, for an edit trainer (``needs_controls``), a dataset in which no sample
  has a control (a control folder named other than the layout reads: the message names the unread folder).
  With ``data.allow_no_controls`` that last one is a warning instead.

``validate_dataset`` is the same check made fatal: ``qflux train`` and ``qflux cache`` run it before they write
anything (docs/errors.md, "Bad samples: validated upfront").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from qflux.config.schema import DataConfig
from qflux.data.folder import CONTROL_DIR, TARGET_DIR
from qflux.data.images import open_mask, open_rgb, probe_size
from qflux.data.records import DataProblem, ImageRef, SampleRecord, SourceScan
from qflux.data.resize import plan_size, resize_mode, shares_target_geometry
from qflux.data.sources import empty_folder_hint, format_problems, scan_dataset, split_holdout
from qflux.errors import DataError

log = logging.getLogger("qflux.data")

EMPTY_HINT = "add training_images/<stem>.png with training_images/<stem>.txt (or rows to the manifest)"
ALLOW_HINT = "to train text-to-image on purpose, pass --allow-no-controls (or set data.allow_no_controls: true)"
T = TypeVar("T")
R = TypeVar("R")
Size = tuple[int, int]  # (w, h)


@dataclass(frozen=True)
class ReportLine:
    """One printed fact: ``label`` (e.g. "controls"), ``text`` and indented ``details``."""

    label: str
    text: str
    details: tuple[str, ...] = ()


@dataclass
class DataReport:
    """What a check found. ``problems`` are fatal before a run (``ok``: none); the rest is information."""

    samples: int
    problems: list[DataProblem] = field(default_factory=list)
    source: str = ""  # e.g. "folder data/pairs"
    warnings: list[DataProblem] = field(default_factory=list)  # loud, not fatal (an allowed dataset without controls)
    skipped: list[DataProblem] = field(default_factory=list)  # files and folders not read, with the reason
    controls: dict[int, int] = field(default_factory=dict)  # number of controls -> samples
    masks: int = 0  # samples with a mask
    resize: str = ""  # how targets are sized, e.g. "budget 512x512 px, aspect kept"
    sizes: dict[Size, int] = field(default_factory=dict)  # planned target (w, h) -> samples (decoded targets)
    held_out: list[str] = field(default_factory=list)  # keys of the samples data.holdout keeps out of training
    holdout_note: str = ""  # e.g. "data.holdout 10 >= samples: holding out 9"
    notes: list[ReportLine] = field(default_factory=list)  # lines added by further measurements

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[ReportLine]:
        """The facts, in print order."""
        n = self.samples
        counts = ", ".join(
            f"{self.controls[c]} with {c}" + (" (text-to-image)" if c == 0 else "") for c in sorted(self.controls)
        )
        out = [ReportLine("samples", str(n)), ReportLine("controls", counts or "-")]
        out.append(ReportLine("masks", f"{self.masks} of {n}" if self.masks else "none"))
        by_count = sorted(self.sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        sizes = ", ".join(f"{w}x{h} x{k}" for (w, h), k in by_count[:8])
        more = f", ... ({len(by_count) - 8} more sizes)" if len(by_count) > 8 else ""
        out.append(ReportLine("sizes", f"{self.resize}: {sizes}{more}" if sizes else self.resize))
        held = (f"{len(self.held_out)} ({', '.join(self.held_out[:6])}{' ...' if len(self.held_out) > 6 else ''}); "
                f"{n - len(self.held_out)} train" if self.held_out else "none")
        out.append(ReportLine("held out", held + (f" ({self.holdout_note})" if self.holdout_note else "")))
        out.append(ReportLine("skipped", f"{len(self.skipped)} file(s) or folder(s) not read" if self.skipped
                              else "nothing", tuple(str(p) for p in self.skipped)))
        return [*out, *self.notes]


@dataclass
class _Checked:
    """What decoding one record found: its problems and the target's size (None: not decoded)."""

    problems: list[DataProblem]
    target_size: Size | None = None
    own_aspect: bool = False  # a control of another aspect than the target: not cropped with it


def _where(ref: ImageRef) -> str:
    return ref.describe()


def _mask_content(ref: ImageRef, image: object) -> DataProblem | None:
    """An all-black mask, or one holding only 0 and 1 (saved as a 0/1 array: it looks black), marks no edited
    region: masks are read 0..255 with white = edited, so its sample would train with the background weight
    everywhere."""
    _, high = image.getextrema()  # type: ignore[attr-defined]
    if high == 0:
        return DataProblem(_where(ref), "the mask is all black: it marks no edited region (white = edited); "
                                        "paint the edited region white or remove the mask")
    if high == 1:
        return DataProblem(_where(ref), "the mask holds only the values 0 and 1, so it looks all black and marks "
                                        "no edited region (masks are read 0..255, white = edited); save it with "
                                        "255 for the edited region (multiply it by 255)")
    return None


def _check_one(record: SampleRecord, data: DataConfig, decode: bool = True) -> _Checked:
    checked = _Checked([])
    problems = checked.problems
    for role, ref in record.images:
        try:
            if decode:
                image = open_mask(ref) if role == "mask" else open_rgb(ref, role)
                size = image.size
            else:
                image, size = None, probe_size(ref, role)
        except DataError as err:
            reason = str(err)
            prefix = f"{ref.describe()}: "
            problems.append(DataProblem(_where(ref), reason[len(prefix) :] if reason.startswith(prefix) else reason))
            continue
        w, h = size
        if role == "target":
            checked.target_size = size
        elif role != "mask" and checked.target_size is not None:
            checked.own_aspect |= not shares_target_geometry(checked.target_size, size)
        if role == "mask":
            if checked.target_size is not None and size != checked.target_size:
                ts = checked.target_size
                problems.append(
                    DataProblem(
                        _where(ref),
                        f"mask is {w}x{h} but the target is {ts[0]}x{ts[1]}; make the mask the target's size",
                    )
                )
            elif image is not None and (found := _mask_content(ref, image)) is not None:
                problems.append(found)
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
    return checked


def check_record(record: SampleRecord, data: DataConfig, decode: bool = True) -> list[DataProblem]:
    """Decode every image of one record and report what is wrong with it. ``decode=False`` reads only the
    image headers (sizes): for records already known to decode, e.g. with a verified cache entry."""
    return _check_one(record, data, decode).problems


def control_count_problems(records: list[SampleRecord], max_controls: int | None = None,
                           mixed: bool = False) -> list[DataProblem]:
    """Samples with fewer controls than the most common count (unless ``mixed``: ``data.mixed_controls``, counts
    that differ on purpose), and (given ``max_controls``) more than that."""
    problems: list[DataProblem] = []
    counts = Counter(len(r.controls) for r in records)
    if not counts:
        return problems
    usual = max(counts, key=lambda c: (counts[c], c))
    for r in records:
        n = len(r.controls)
        if n < usual and not mixed:
            problems.append(
                DataProblem(
                    r.origin,
                    f"'{r.key}' has {n} control image(s) while {counts[usual]} of {len(records)} samples have "
                    f"{usual}; add the missing control image(s) (samples with different numbers of controls on purpose: "
                    f"set data.mixed_controls: true)",
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


def mask_count_problems(records: Sequence[SampleRecord]) -> list[DataProblem]:
    """A sample without a mask while most samples have one: a forgotten mask, which silently weighs its edited
    region like the background. (A few masked samples among unmasked ones are fine: masks are optional.)"""
    masked = sum(1 for r in records if r.mask is not None)
    if masked * 2 <= len(records) or masked == len(records):
        return []
    return [
        DataProblem(r.origin, f"'{r.key}' has no mask while {masked} of {len(records)} samples have one; add its "
                              "mask (white = edited region) or remove the other masks")
        for r in records if r.mask is None
    ]


def control_presence_problem(scan: SourceScan, allowed: bool) -> DataProblem | None:
    """For an edit trainer: the dataset has samples but none has a control image. Names the folders near the
    dataset that hold images named like the targets and are not read (a control folder named ``controls/``)."""
    if not scan.records or any(r.controls for r in scan.records):
        return None
    candidates = [u for u in scan.unread if u.matching]
    where = scan.description.removeprefix("folder ").removeprefix("manifest ").removeprefix("dataset ")
    reason = (f"no sample has a control image: the trainer edits images, so all {len(scan.records)} samples would "
              "train as text-to-image")
    if candidates:
        best = max(candidates, key=lambda u: u.matching)
        reason += (f"; {best.path} holds {best.matching} image(s) named like the targets and is not read: "
                   f"{_candidate_fix(scan, best.path)}")
        where = str(best.path)
    elif scan.control_hint:
        reason += f"; {scan.control_hint}"
    return DataProblem(where, reason + ("; training anyway: data.allow_no_controls is set (--allow-no-controls)"
                                        if allowed else f"; {ALLOW_HINT}"))


def _candidate_fix(scan: SourceScan, folder: Path) -> str:
    if scan.control_hint.startswith(f"add {CONTROL_DIR}/"):  # the qflux layout
        root = folder.parent.parent if folder.parent.name == TARGET_DIR else folder.parent
        return (f"rename it {CONTROL_DIR}/ (or set data.path: {root / TARGET_DIR} and data.control_path: "
                f"{folder})")
    return f"set data.control_path: {folder}"


def _map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    if workers <= 0:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
        return list(pool.map(fn, items))


def _describe_resize(data: DataConfig) -> str:
    mode, res = resize_mode(data), data.resolution
    if mode == "budget":
        side = f"{res}x{res}" if isinstance(res, int) else f"{res[0]}x{res[1]}" if isinstance(res, tuple) else str(res)
        return f"budget {side} px, aspect kept"
    if mode == "fixed":
        return "fixed size, center-cropped"
    return "aspect buckets" + (" (generated)" if isinstance(res, int) else "")


def _summarise(report: DataReport, data: DataConfig, records: Sequence[SampleRecord],
               checked: Sequence[_Checked]) -> None:
    """Fill the report's facts from the records and what decoding them found."""
    report.controls = dict(sorted(Counter(len(r.controls) for r in records).items()))
    report.masks = sum(1 for r in records if r.mask is not None)
    report.resize = _describe_resize(data)
    report.sizes = dict(Counter(plan_size(*c.target_size, data) for c in checked if c.target_size is not None))
    if own := [r.key for r, c in zip(records, checked) if c.own_aspect]:
        report.notes.append(ReportLine("own-aspect controls", f"{len(own)} sample(s) whose control has another "
                                       "aspect than the target: sized on its own, not cropped with the target ("
                                       f"{', '.join(own[:6])}{' ...' if len(own) > 6 else ''})"))
    if not data.holdout or len(records) < 2:
        report.holdout_note = f"data.holdout: {data.holdout}" + (" needs at least 2 samples" if data.holdout else "")
    else:
        n = data.holdout
        if n >= len(records):
            n = len(records) - 1
            report.holdout_note = f"data.holdout {data.holdout} >= the {len(records)} samples: holding out {n}"
        report.held_out = [r.key for r in split_holdout(records, n)[1]]


def _empty_hint(data: DataConfig) -> str:
    return empty_folder_hint(data) if data.control_path is not None else EMPTY_HINT


def _inspect(data: DataConfig, base_dir: Path | None, max_controls: int | None,
             decoded: Callable[[SampleRecord], bool] | None = None,
             needs_controls: bool = False) -> tuple[SourceScan, DataReport]:
    scan = scan_dataset(data, base_dir)
    if not scan.records and not scan.errors and not scan.warnings:
        raise DataError(f"{scan.description}: no samples found; {_empty_hint(data)}")
    problems = [*scan.errors, *scan.warnings]
    warnings: list[DataProblem] = []

    def one(record: SampleRecord) -> _Checked:
        return _check_one(record, data, decode=not (decoded is not None and decoded(record)))

    checked = _map(one, scan.records, data.workers)
    for found in checked:
        problems.extend(found.problems)
    problems.extend(control_count_problems(scan.records, max_controls, data.mixed_controls))
    problems.extend(mask_count_problems(scan.records))
    if needs_controls and (missing := control_presence_problem(scan, data.allow_no_controls)) is not None:
        problems = [p for p in problems if p.file != missing.file]  # the unread folder it names: said once
        (warnings if data.allow_no_controls else problems).append(missing)
    unique = list(dict.fromkeys(problems))
    unique.sort(key=lambda p: (p.file, p.reason))
    report = DataReport(samples=len(scan.records), problems=unique, source=scan.description, warnings=warnings,
                        skipped=list(scan.skipped))
    _summarise(report, data, scan.records, checked)
    return scan, report


def inspect_dataset(data: DataConfig, base_dir: Path | None = None, max_controls: int | None = None,
                    needs_controls: bool = False) -> DataReport:
    """Scan and decode the whole dataset; ``DataError`` only when it cannot be opened at all (missing path,
    unknown scheme, unreadable manifest) or holds nothing. ``max_controls`` / ``needs_controls``: the trainer's
    (``TrainerInfo``). Also measures each same-aspect control against its target (``qflux.data.alignment``):
    pairs shifted or zoomed beyond a tolerance are warnings."""
    from qflux.data.alignment import add_to_report

    scan, report = _inspect(data, base_dir, max_controls, needs_controls=needs_controls)
    add_to_report(report, scan.records, data.workers)
    return report


def validate_dataset(data: DataConfig, base_dir: Path | None = None, max_controls: int | None = None,
                     decoded: Callable[[SampleRecord], bool] | None = None,
                     needs_controls: bool = False) -> list[SampleRecord]:
    """The check ``qflux train`` and ``qflux cache`` run before they write anything: every problem that
    ``qflux data check`` reports is fatal here, and one ``DataError`` lists them all (the first
    ``MAX_LISTED``), so a run never stops on a bad sample after hours of work. Returns the records. Warnings
    and skipped files are logged.

    ``decoded(record)`` True means the record's images are known to decode (a verified cache entry holds the
    encoding of these exact bytes): only their headers are read, so a run with a full cache pays no decoding.
    """
    scan, report = _inspect(data, base_dir, max_controls, decoded, needs_controls)
    if report.problems:
        problems = report.problems
        files = len({p.file for p in problems})
        raise DataError(
            f"{scan.description}: {len(problems)} problem(s) in {files} file(s); fix or remove these samples, "
            f"then run again (`qflux data check --config FILE` lists every problem):\n{format_problems(problems)}"
        )
    if not scan.records:
        raise DataError(f"{scan.description}: no samples found; {_empty_hint(data)}")
    for warning in report.warnings:
        log.warning("WARNING: %s", warning)
    if report.skipped:
        log.warning("%s: %d file(s) or folder(s) not read:\n%s", scan.description, len(report.skipped),
                    format_problems(report.skipped))
    return scan.records


def check_dataset(data: DataConfig, base_dir: Path | None = None, max_controls: int | None = None,
                  needs_controls: bool = False) -> list[DataProblem]:
    """Every problem of the dataset ``data.path`` names (empty list: clean); see the module docstring."""
    return inspect_dataset(data, base_dir, max_controls, needs_controls).problems
