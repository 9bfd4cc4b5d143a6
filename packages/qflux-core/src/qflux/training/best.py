"""``validation.select_best``: keep the LoRA of the validation step that scored best on one metric.

The final step is not always the best one (an edit LoRA often starts to shift or over-edit late), and
checkpoints are pruned: the best step's LoRA goes to ``output.dir/best/pytorch_lora_weights.safetensors``
when it is measured, with ``best.json`` saying which step and value it holds. Step 0 (the untrained LoRA)
is not a candidate. ``best.json`` also carries the comparison over a ``--resume``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError

# How each selectable metric improves. val_edit_change is left out on purpose: more change inside the edited
# region is not a better edit (a LoRA that paints noise there scores high).
DIRECTIONS: dict[str, str] = {
    "val_loss": "min",
    "val_shift_px": "min",
    "val_zoom": "closest to 1",
    "val_unedited_psnr": "max",
}
BEST_DIR = "best"
RECORD = "best.json"


@dataclass(frozen=True)
class BestStep:
    metric: str
    step: int
    value: float


def _badness(metric: str, value: float) -> float:
    """Lower is better, for every metric."""
    direction = DIRECTIONS[metric]
    if direction == "min":
        return value
    if direction == "max":
        return -value
    return abs(math.log(value))  # a zoom of 0.95 is as bad as one of 1/0.95


class BestSelector:
    """Compares each validation step's value of ``metric`` with the best so far and exports on improvement."""

    def __init__(self, metric: str, output_dir: Path) -> None:
        if metric not in DIRECTIONS:
            raise ValueError(f"unknown select_best metric {metric!r}")
        self.metric = metric
        self.directory = output_dir / BEST_DIR
        self.best = self._read()

    def _read(self) -> BestStep | None:
        """The best of an earlier part of this run (``--resume``); ignored when it ranked another metric."""
        try:
            found = BestStep(**json.loads((self.directory / RECORD).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return found if found.metric == self.metric else None

    def offer(self, step: int, values: dict[str, float | None], export: Callable[[Path], Path]) -> BestStep | None:
        """If ``values[metric]`` beats the best so far: ``export(directory)`` writes the LoRA, then the record;
        returns the new best (None: no improvement, or the metric was not measured at this step)."""
        value = values.get(self.metric)
        if value is None or not math.isfinite(value) or step <= 0:
            return None
        if self.best is not None and _badness(self.metric, value) >= _badness(self.metric, self.best.value):
            return None
        export(self.directory)
        self.best = BestStep(self.metric, step, float(value))
        (self.directory / RECORD).write_text(json.dumps(asdict(self.best)) + "\n", encoding="utf-8")
        return self.best


def check_select_best(config: QfluxConfig) -> None:
    """``ConfigError`` when ``validation.select_best`` names a metric this config never measures (the run would
    end without a best LoRA after hours of work)."""
    v = config.validation
    metric = v.select_best
    if metric is None:
        return
    key = f"validation.select_best: {metric}"
    if not v.every:
        raise ConfigError(f"{key} compares validation steps, but validation.every is 0; set validation.every")
    holdout = config.data.holdout > 0
    if metric == "val_loss":
        if not holdout:
            raise ConfigError(f"{key} needs held-out samples: set data.holdout (e.g. 4)")
        return
    sampled = bool(v.samples) or (v.from_holdout > 0 and holdout)
    if not sampled:
        raise ConfigError(f"{key} is measured on validation samples: add validation.samples, or set "
                          "validation.from_holdout with data.holdout")
    if metric == "val_unedited_psnr" and not (any(s.target for s in v.samples) or (v.from_holdout > 0 and holdout)):
        raise ConfigError(f"{key} needs a known target: give validation.samples a target, or set "
                          "validation.from_holdout with data.holdout")
