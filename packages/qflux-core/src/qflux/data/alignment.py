"""Pair alignment for ``qflux data check``: the shift and zoom between each control and its target outside
the mask (``qflux.fidelity``), and a warning for every pair beyond a tolerance.

An edit LoRA learns whatever differs between control and target, a misalignment included: a dataset whose
controls sit a few pixels off (a re-export with another crop, a resized screenshot) teaches every output to
shift or zoom. Such pairs are warnings, not errors: an edit that moves the camera is misaligned on purpose.

Only controls with the target's aspect are measured (resized to the target's size first): a control of
another aspect keeps its own framing in training, so there is no pixel correspondence to check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qflux.data.images import open_mask, open_rgb
from qflux.data.records import DataProblem, SampleRecord
from qflux.errors import DataError
from qflux.fidelity import Alignment, estimate_alignment, same_aspect

if TYPE_CHECKING:  # pragma: no cover
    from qflux.data.check import DataReport

SHIFT_TOLERANCE_PX = 1.0  # in target pixels: below this a shift is invisible at any training resolution
ZOOM_TOLERANCE = 0.01  # 1%: 5 px at the border of a 1024-px image
# Pairs are measured at up to this many pixels on the longer side (the shift comes back in target pixels):
# enough for a tenth of a pixel at that size, and a large dataset stays a matter of minutes.
MEASURE_SIDE = 384


@dataclass(frozen=True)
class PairAlignment:
    """One control of one sample against its target."""

    key: str  # the sample's stem
    control: str  # the control image, as messages name it
    alignment: Alignment

    def beyond(self, shift_tolerance: float = SHIFT_TOLERANCE_PX, zoom_tolerance: float = ZOOM_TOLERANCE) -> bool:
        return self.alignment.shift_px > shift_tolerance or abs(self.alignment.zoom - 1.0) > zoom_tolerance

    def describe(self) -> str:
        a = self.alignment
        return (f"'{self.key}': the target is shifted by {a.shift_px:.1f} px (dx {a.dx:+.1f}, dy {a.dy:+.1f}) and "
                f"zoomed {a.zoom:.3f}x against its control outside the mask")


def measure_record(record: SampleRecord) -> list[PairAlignment]:
    """Every control of ``record`` with the target's aspect against the target (outside the mask). Unreadable
    images and images without structure to correlate are skipped: the decoding check reports the former."""
    if record.target is None or not record.controls:
        return []
    try:
        target = open_rgb(record.target, "target")
        mask = open_mask(record.mask) if record.mask is not None else None
    except DataError:
        return []
    if mask is not None and mask.size != target.size:
        mask = None  # reported by the decoding check; measure the whole pair rather than nothing
    found = []
    for i, ref in enumerate(record.controls):
        try:
            control = open_rgb(ref, "control" if i == 0 else f"control_{i}")
        except DataError:
            continue
        if not same_aspect(control.size, target.size):
            continue
        alignment = estimate_alignment(control, target, mask, shift_max_side=MEASURE_SIDE)
        if alignment is not None:
            found.append(PairAlignment(record.key, ref.describe(), alignment))
    return found


def measure_dataset(records: Iterable[SampleRecord], workers: int = 0) -> list[PairAlignment]:
    """``measure_record`` over ``records`` (threads when ``workers`` > 0: decoding and FFTs release the GIL)."""
    records = list(records)
    if workers <= 0:
        results = [measure_record(r) for r in records]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(measure_record, records))
    return [pair for found in results for pair in found]


def misaligned(pairs: Iterable[PairAlignment], shift_tolerance: float = SHIFT_TOLERANCE_PX,
               zoom_tolerance: float = ZOOM_TOLERANCE) -> list[DataProblem]:
    """A warning (``DataProblem``: file = the control) for each pair beyond the tolerances."""
    return [
        DataProblem(pair.control, f"{pair.describe()} (tolerance {shift_tolerance:g} px, zoom "
                                  f"{zoom_tolerance:.0%}); an edit LoRA learns this misalignment: align the "
                                  "control with its target, or ignore this if the edit moves the camera")
        for pair in pairs if pair.beyond(shift_tolerance, zoom_tolerance)
    ]


def add_to_report(report: DataReport, records: Sequence[SampleRecord], workers: int = 0) -> None:
    """``qflux data check``: a warning per pair beyond the tolerances and one line saying what was measured."""
    from qflux.data.check import ReportLine

    pairs = measure_dataset(records, workers)
    warnings = misaligned(pairs)
    report.warnings.extend(warnings)
    text = (f"{len(pairs)} same-aspect control/target pair(s) measured outside the mask: "
            + (f"{len(warnings)} shifted by more than {SHIFT_TOLERANCE_PX:g} px or zoomed by more than "
               f"{ZOOM_TOLERANCE:.0%} (warnings below)" if warnings else "all aligned"))
    report.notes.append(ReportLine("alignment", text if pairs else "no control with its target's aspect to measure"))
