"""Edit fidelity of the validation samples: per case, the first control against the generated sample
(``qflux.fidelity``), and the means that go to ``metrics.jsonl`` / TensorBoard / ``fidelity.png``.

- ``val_shift_px``, ``val_zoom``: how far the sample's unedited content moved / scaled against the control
  (0 px and 1.00 for a LoRA that keeps the picture in place);
- with a known target: ``val_unedited_psnr``, the PSNR of the sample against the control where the edit
  should change nothing (outside the mask; without one, where control and target agree), and
  ``val_edit_change``, the mean absolute change (0..1) inside the edited region (0: the edit did not happen;
  the target's own change, ``target_change`` per case, is what it aims at), and ``val_edit_score``, the
  fraction (0..1) of the edited region where the sample has the target's colour (``fidelity.edit_score``:
  within 0.15 on every channel): on ``builtin:shapes`` edits, how much of the shape took the new colour.

Runs only at validation, on the main process, on images already rendered: no work is added to training steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qflux.fidelity import edit_score, estimate_alignment, mean_change, psnr, same_aspect, unedited_region

KEYS = ("val_shift_px", "val_zoom", "val_unedited_psnr", "val_edit_change", "val_edit_score")


@dataclass(frozen=True)
class CaseFidelity:
    """One validation case; None where it cannot be measured (no control of the sample's aspect, no target,
    nothing to correlate)."""

    shift_px: float | None = None
    dx: float | None = None
    dy: float | None = None
    zoom: float | None = None
    match: float | None = None  # the correlation peak (0..1): below ~0.3 the sample hardly resembles the control
    unedited_psnr: float | None = None
    edit_change: float | None = None
    target_change: float | None = None  # the target's change inside the edited region (what edit_change aims at)
    edit_score: float | None = None  # the share of the edited region in the target's colour (1: the edit is done)

    def as_row(self) -> dict[str, float]:
        """The measured values, rounded for the log."""
        return {k: round(v, 4) for k, v in asdict(self).items() if v is not None}


def measure_case(controls: list[Any], target: Any | None, mask: Any | None, sample: Any) -> CaseFidelity:
    """``sample`` against ``controls[0]`` (resized to the sample's size when its aspect is the sample's)."""
    if not controls or not same_aspect(controls[0].size, sample.size):
        return CaseFidelity()
    control = controls[0].convert("RGB").resize(sample.size) if controls[0].size != sample.size else controls[0]
    if target is not None and target.size != sample.size:
        target = target.convert("RGB").resize(sample.size)
    if mask is not None and mask.size != sample.size:
        mask = mask.resize(sample.size)
    region = unedited_region(control, target, mask) if target is not None else None
    # the edited region takes no part in the alignment: a moved object must not read as a moved picture
    alignment = estimate_alignment(control, sample, mask if mask is not None else _edited_mask(region))
    values: dict[str, float | None] = {}
    if alignment is not None:
        values.update(shift_px=alignment.shift_px, dx=alignment.dx, dy=alignment.dy, zoom=alignment.zoom,
                      match=alignment.peak)
    if region is not None:
        values.update(unedited_psnr=psnr(control, sample, region), edit_change=mean_change(control, sample, ~region),
                      target_change=mean_change(control, target, ~region),
                      edit_score=edit_score(target, sample, ~region))
    return CaseFidelity(**values)


def _edited_mask(unedited: np.ndarray | None) -> np.ndarray | None:
    if unedited is None:
        return None
    return np.where(unedited, 0, 255).astype(np.uint8)


def summarize(cases: list[CaseFidelity]) -> dict[str, float]:
    """``val_*`` means over the cases that have each value (a key is absent when no case has it)."""
    out: dict[str, float] = {}
    for key in KEYS:
        values = [getattr(c, key.removeprefix("val_")) for c in cases]
        values = [v for v in values if v is not None]
        if values:
            out[key] = round(float(np.mean(values)), 4)
    return out


def describe(case: CaseFidelity) -> str:
    """One line for the grid's caption, e.g. "shift 0.4 px, zoom 1.002, unedited 31.2 dB, edit change 0.12,
    edit score 0.85"."""
    parts = []
    if case.shift_px is not None and case.zoom is not None:
        parts += [f"shift {case.shift_px:.1f} px", f"zoom {case.zoom:.3f}", f"match {case.match:.2f}"]
    if case.unedited_psnr is not None:
        parts.append(f"unedited {case.unedited_psnr:.1f} dB")
    if case.edit_change is not None:
        parts.append(f"edit change {case.edit_change:.2f}")
    if case.edit_score is not None:
        parts.append(f"edit score {case.edit_score:.2f}")
    return ", ".join(parts)


def score_note(means: dict[str, float], base: dict[str, float] | None = None) -> str:
    """The console's note on a validation: " (edit score 0.85, base 0.03; unedited 31.2 dB, base 30.9 dB)", the
    base's figures (step 0) when known; "" without an edit score."""
    if "val_edit_score" not in means:
        return ""
    parts = [f"edit score {means['val_edit_score']:.2f}"]
    if base and "val_edit_score" in base:
        parts[-1] += f", base {base['val_edit_score']:.2f}"
    if "val_unedited_psnr" in means:
        parts.append(f"unedited {means['val_unedited_psnr']:.1f} dB")
        if base and "val_unedited_psnr" in base:
            parts[-1] += f", base {base['val_unedited_psnr']:.1f} dB"
    return " (" + "; ".join(parts) + ")"
