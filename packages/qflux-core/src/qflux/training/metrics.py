"""Run logs: ``metrics.jsonl`` (one JSON object per event), TensorBoard scalars/images, the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends to ``metrics.jsonl`` and mirrors scalars to TensorBoard (``output_dir/tensorboard``)."""

    def __init__(self, output_dir: Path, tensorboard: bool = True) -> None:
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def image(self, tag: str, image, step: int) -> None:
        if self._writer is not None:
            import numpy as np

            self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> Path:
    """Training loss (raw and smoothed) and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display; this only selects the backend of this process's figures
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, alpha=0.3, label="train loss")
        smooth, acc = [], losses[0]
        for v in losses:
            acc = 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax.plot(steps, smooth, label="train loss (EMA 0.9)")
    if val:
        ax.plot(*zip(*val), marker="o", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# (key, panel title, what a good LoRA shows) for ``plot_fidelity``
FIDELITY_PANELS = (
    ("val_shift_px", "shift vs control (px)", 0.0),
    ("val_zoom", "zoom vs control", 1.0),
    ("val_unedited_psnr", "unedited-region PSNR (dB)", None),
    ("val_edit_change", "change inside the edit (0..1)", None),
)


def plot_fidelity(metrics_path: Path, out: Path) -> Path | None:
    """The validation samples' edit-fidelity means (``qflux.training.val_fidelity``) against the step, one
    panel each, with the ideal value as a dashed line; None (no file) when no validation measured any."""
    rows = read_metrics(metrics_path)
    series = {key: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
              for key, _, _ in FIDELITY_PANELS}
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 5), dpi=100, sharex=True)
    for ax, (key, title, ideal) in zip(axes.flat, FIDELITY_PANELS):
        if series[key]:
            ax.plot(*zip(*series[key]), marker="o")
        if ideal is not None:
            ax.axhline(ideal, linestyle="--", color="grey", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
