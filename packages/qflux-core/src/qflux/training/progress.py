"""A rich progress bar for the step loop: step / total, loss, lr, it/s and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[rate]} it/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss="-", lr="-", rate="-")
        self._start = start

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float) -> None:
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:.2f}")
