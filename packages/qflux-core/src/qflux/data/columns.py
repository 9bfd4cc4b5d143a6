"""Which table column (manifest or Hugging Face dataset) holds which part of a sample.

qflux names: ``target``, ``control`` (or ``control_0``), ``control_1``, ``control_2`` ..., ``mask``, ``prompt``
and ``key`` (sample name, optional). ``data.columns`` maps qflux names to column names; a name it does not map
uses the column of the same name when there is one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qflux.errors import DataError

_CONTROL_RE = re.compile(r"^control(?:_(\d+))?$")
FIXED_NAMES = ("target", "mask", "prompt", "key")


def _control_index(name: str) -> int | None:
    match = _CONTROL_RE.match(name)
    if not match:
        return None
    return int(match[1]) if match[1] is not None else 0


@dataclass(frozen=True)
class ColumnMap:
    """Resolved column names; ``controls`` in order (main control first)."""

    target: str
    controls: tuple[str, ...] = ()
    mask: str | None = None
    prompt: str | None = None
    key: str | None = None

    @classmethod
    def resolve(cls, mapping: Mapping[str, str], available: Sequence[str], source: str) -> ColumnMap:
        """Apply ``data.columns`` (``mapping``) to the ``available`` columns of ``source``; ``DataError`` for
        unknown qflux names, columns that do not exist, or no target column."""
        cols = list(available)
        shown = ", ".join(cols) or "none"
        chosen: dict[str, str] = {}
        controls: dict[int, str] = {}
        for name, column in mapping.items():
            if name not in FIXED_NAMES and _control_index(name) is None:
                valid = [*FIXED_NAMES, "control", "control_1"]
                hint = difflib.get_close_matches(name, valid, n=1)
                raise DataError(
                    f"data.columns: unknown name '{name}'"
                    + (f" (did you mean '{hint[0]}'?)" if hint else "")
                    + "; use target, control, control_1 ..., mask, prompt, key"
                )
            if column not in cols:
                hint = difflib.get_close_matches(column, cols, n=1)
                raise DataError(
                    f"data.columns.{name}: {source} has no column '{column}'"
                    + (f" (did you mean '{hint[0]}'?)" if hint else "")
                    + f"; its columns are: {shown}"
                )
            index = _control_index(name)
            if index is None:
                chosen[name] = column
            elif index in controls:
                raise DataError(f"data.columns: control {index} is mapped twice (control and control_0 are the same)")
            else:
                controls[index] = column
        for name in FIXED_NAMES:
            if name not in chosen and name in cols and name not in mapping.values():
                chosen[name] = name
        mapped = set(mapping.values())
        for column in cols:
            index = _control_index(column)
            if index is not None and index not in controls and column not in mapped:
                if index == 0 and "control" in cols and "control_0" in cols:
                    raise DataError(f"{source}: has both 'control' and 'control_0' columns; keep one")
                controls[index] = column
        if "target" not in chosen:
            raise DataError(
                f"{source}: no target column; map one with data.columns (e.g. "
                f"{{target: edited_image, control: input_image, prompt: instruction}}); its columns are: {shown}"
            )
        return cls(
            target=chosen["target"],
            controls=tuple(controls[i] for i in sorted(controls)),
            mask=chosen.get("mask"),
            prompt=chosen.get("prompt"),
            key=chosen.get("key"),
        )
