"""Training checkpoints: ``checkpoints/step-000250/`` with LoRA, optimizer, LR scheduler and data position,
and the files run callbacks add (``qflux_checkpoint_files``: ``train.ema``'s ``ema.safetensors``).

No RNG state is needed: each sample's noise is a function of (seed, epoch, sample) (``step.sample_generator``).

A checkpoint is written into a temporary folder and renamed into place, and carries a manifest of its
files' sizes and sha256, so a half-written or corrupt checkpoint is detected and skipped on resume.
Everything is read back through safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from qflux.errors import UserError, write_failure
from qflux.filemodes import give_normal_mode
from qflux.killpoints import pause_point
from qflux.layout import CHECKPOINT_ADAPTER as LORA
from qflux.layout import CHECKPOINT_MANIFEST as MANIFEST
from qflux.layout import CHECKPOINT_STATE as STATE
from qflux.layout import CHECKPOINT_TRAINING as TRAINING

CORE_FILES = frozenset({LORA, TRAINING, STATE, MANIFEST})


@dataclass
class TrainingPosition:
    """Where the run stands: optimizer steps done and the data position within the epoch."""

    step: int
    epoch: int
    batch_in_epoch: int  # micro-batches of ``epoch`` already consumed
    config_fingerprint: str  # hash of the config parts a resumed run must share
    processes: int = 1  # the data position counts global batches of batch_size x processes


@dataclass
class Checkpoint:
    path: Path
    position: TrainingPosition
    lora: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write(path: Path, data: bytes | memoryview) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    output_dir: Path,
    position: TrainingPosition,
    lora: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: object,
    keep: int,
    lora_metadata: dict[str, str] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep``.

    ``lora_metadata`` goes into the LoRA file's header (``lora.checkpoint_lora_metadata``: its alpha, so that
    ``qflux sample --lora`` applies the checkpoint's LoRA at the trained strength). ``extra_files`` (name ->
    contents, from the run callbacks) are written with the others and listed in the manifest.

    The files are serialised in memory and written with plain file I/O, so that a full disk (or a read-only
    folder) surfaces as an ``OSError`` naming the file; it becomes a ``UserError`` saying which checkpoint is
    still the latest good one. Nothing of the failed checkpoint is left behind.
    """
    final = checkpoint_dir(output_dir, position.step)
    if final.is_dir() and verify(final) is None:  # this step is saved already (Ctrl-C right after a save,
        return final                               # a resume at max_steps): never replace a good checkpoint
    if final.parent.is_dir():  # temporary folders of writers that were killed mid-save
        for stale in final.parent.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp: Path | None = None
    try:
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, buffer)
        payloads = {LORA: save_safetensors(lora, metadata=lora_metadata), TRAINING: buffer.getbuffer(),
                    STATE: json.dumps(asdict(position), indent=2).encode(), **(extra_files or {})}
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
        files = {}
        for name, data in payloads.items():
            _write(tmp / name, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write(tmp / MANIFEST, json.dumps(files, indent=2).encode())
        give_normal_mode(tmp)  # mkdtemp's 0700 would survive the rename: others could not read the checkpoint
        pause_point("checkpoint-before-rename")  # a kill here leaves a .step-* folder, removed by the next save
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(output_dir) if p != final]
        kept = f"the latest good checkpoint is {previous[-1]}" if previous else "no checkpoint was written yet"
        raise UserError(f"{write_failure(err, f'checkpoint {final}')}. Nothing of it was kept and {kept}: "
                        "continue from it with --resume once fixed") from err
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders excluded)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(path: Path) -> str | None:
    """None when the checkpoint's files match its manifest, else the reason it is unusable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "missing or unreadable manifest"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            return f"{name} is corrupt (size or sha256 differs from the manifest)"
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint: tensors through safetensors, the optimizer / scheduler state through
    ``torch.load(weights_only=True)`` (tensors and plain containers only: a file holding other objects is
    refused with a ``UserError``, never unpickled)."""
    try:
        state = json.loads((path / STATE).read_text())
        training = torch.load(path / TRAINING, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (a refused object), a torn file, bad JSON
        raise UserError(f"checkpoint {path}: cannot read {TRAINING} / {STATE} safely ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); resume from another checkpoint "
                        "(--resume-from) or start a new output.dir") from err
    return Checkpoint(
        path=path,
        position=TrainingPosition(**state),
        lora=load_file(str(path / LORA)),
        optimizer=training["optimizer"],
        lr_scheduler=training["lr_scheduler"],
    )


def latest_valid(output_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported through ``warn`` and skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    return None
