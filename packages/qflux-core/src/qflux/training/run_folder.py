"""What an ``output.dir`` holds, and whether ``qflux train`` may start there (with or without ``--resume``).

A finished run is hours of GPU time: a new run never writes into a folder that holds one (its LoRA,
``config.yaml`` and ``metrics.jsonl`` would be replaced or mixed), and ``--resume`` never starts from step 0
without a word when there is nothing to continue. ``qflux.run.preflight.check_output`` (before any work)
and the training loop (for API callers) ask the same questions here, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from qflux.errors import UserError
from qflux.layout import LORA_FILE
from qflux.training import checkpoint as ckpt

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class RunFolder:
    """The run files found in an ``output.dir`` (other files there are not qflux's and do not count)."""

    path: Path
    checkpoints: tuple[Path, ...]  # checkpoints/step-*/, oldest first
    lora: bool  # the exported adapter file
    metrics: bool
    config: bool
    samples: bool  # validation grids
    adapter_file: str = LORA_FILE  # its name (``Adapter.file_name``)

    @property
    def holds_run(self) -> bool:
        return bool(self.checkpoints) or self.lora or self.metrics or self.config or self.samples

    def found(self) -> str:
        """``checkpoints/ (step-000003, step-000006), pytorch_lora_weights.safetensors, ...``: for messages."""
        items = []
        if self.checkpoints:
            names = [p.name for p in self.checkpoints]
            shown = ", ".join(names[-3:]) if len(names) <= 3 else f"{len(names)} of them, latest {names[-1]}"
            items.append(f"checkpoints/ ({shown})")
        items += [name for name, there in ((self.adapter_file, self.lora), (METRICS_FILE, self.metrics),
                                           (CONFIG_FILE, self.config), (f"{SAMPLES_DIR}/", self.samples)) if there]
        return ", ".join(items)


def inspect_folder(path: Path, adapter_file: str = LORA_FILE) -> RunFolder:
    """The run files in ``path`` (a missing folder holds none); ``adapter_file``: the name of the run's
    exported adapter (``Adapter.file_name``)."""
    samples = path / SAMPLES_DIR
    return RunFolder(
        path=path,
        checkpoints=tuple(ckpt.list_checkpoints(path)),
        lora=(path / adapter_file).is_file(),
        metrics=(path / METRICS_FILE).is_file(),
        config=(path / CONFIG_FILE).is_file(),
        samples=samples.is_dir() and any(samples.glob("step-*")),
    )


# --------------------------------------------------------------------------- a new run


def refuse_existing_run(folder: RunFolder) -> None:
    """``UserError`` when a new run (no ``--resume``) would write into a folder that holds a run."""
    if not folder.holds_run:
        return
    where = f"output.dir {folder.path} already holds a run (found: {folder.found()})"
    if folder.checkpoints:
        fix = "pass --resume to continue it from its latest checkpoint, or choose another output.dir"
    elif folder.lora:
        fix = ("it finished without checkpoints (train.save_every: 0), so --resume cannot continue it; choose "
               "another output.dir, or remove the folder to train it again")
    else:
        fix = "it stopped before its first checkpoint: remove the folder to start over, or choose another output.dir"
    if (folder.config and not folder.checkpoints and not folder.lora and not folder.metrics
            and not folder.samples):
        fix += f" (if {CONFIG_FILE} is your own config file, keep it outside output.dir: each run writes its config there)"
    raise UserError(f"{where}: {fix}")


# --------------------------------------------------------------------------- --resume


def _nothing_to_resume(folder: RunFolder) -> UserError:
    """Why ``--resume`` finds no checkpoint in ``folder``, and what to do instead."""
    if not folder.holds_run:
        return UserError(f"--resume: output.dir {folder.path} holds no run to continue (no checkpoints/step-*/ "
                         "there); drop --resume to start a new run, or set output.dir to the folder of the run")
    if folder.lora:
        return UserError(f"--resume: output.dir {folder.path} holds a finished run without checkpoints (found: "
                         f"{folder.found()}): with train.save_every: 0 only the final LoRA is written, not the "
                         "optimizer state and data position a resume continues from, so it cannot be continued; "
                         "start a new run in another output.dir (and set train.save_every > 0 to be able to "
                         "continue runs)")
    return UserError(f"--resume: output.dir {folder.path} holds a run that stopped before its first checkpoint "
                     f"(found: {folder.found()}): there is nothing to resume; remove the folder and run without "
                     "--resume to start over")


def latest_checkpoint(folder: RunFolder, warn: Callable[[str], None]) -> Path:
    """The newest intact checkpoint of ``folder`` for ``--resume``; ``UserError`` when there is none (a silent
    start from step 0 would cost the steps the user thinks are saved)."""
    if not folder.checkpoints:
        raise _nothing_to_resume(folder)
    problems = []
    for path in reversed(folder.checkpoints):
        problem = ckpt.verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
        problems.append(f"{path.name}: {problem}")
    raise UserError(f"--resume: no usable checkpoint in {folder.path / 'checkpoints'} ({'; '.join(problems)}): "
                    "nothing to resume; pass --resume-from an intact checkpoint, or start a new output.dir")


def check_resume_from(folder: RunFolder, checkpoint: Path) -> None:
    """``--resume-from`` a checkpoint of another run must not write into a folder holding a third one."""
    inside = folder.path.resolve() in checkpoint.resolve().parents
    if folder.holds_run and not inside:
        raise UserError(f"--resume-from {checkpoint}: output.dir {folder.path} holds another run (found: "
                        f"{folder.found()}); set output.dir to the folder of that checkpoint's run, or to a new one")


def resume_point(output_dir: Path, resume: bool | Path, warn: Callable[[str], None],
                 adapter_file: str = LORA_FILE) -> Path | None:
    """The checkpoint to continue from (None: a new run), after refusing what would overwrite or silently
    restart a run. ``resume`` is False (a new run), True (``--resume``) or a checkpoint (``--resume-from``)."""
    folder = inspect_folder(output_dir, adapter_file)
    if resume is False:
        refuse_existing_run(folder)
        return None
    if resume is True:
        return latest_checkpoint(folder, warn)
    path = Path(resume)
    check_resume_from(folder, path)
    return path


# --------------------------------------------------------------------------- a resume at or past max_steps


class Remaining(Enum):
    """What a resume has left to do."""

    TRAIN = "train"  # steps remain
    EXPORT = "export"  # at max_steps, the final LoRA is missing (killed after the last checkpoint)
    NOTHING = "nothing"  # the run is complete: its LoRA is the checkpoint's


def exported_from(output_dir: Path, checkpoint: Path, adapter_file: str = LORA_FILE) -> bool:
    """Whether the exported adapter of ``output_dir`` is of the checkpoint's weights (the export of an
    earlier, shorter run does not count: a run resumed with a higher max_steps and killed after its last
    checkpoint still needs its export). Both files record the digest of the adapter's state
    (``STATE_DIGEST``): the export may hold the weights in another form (LoRA: alpha / rank baked in). Files
    without it (qflux 0.2) are compared tensor by tensor."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from qflux.adapters.base import STATE_DIGEST

    try:
        with safe_open(str(output_dir / adapter_file), "pt") as f:
            exported_digest = (f.metadata() or {}).get(STATE_DIGEST)
        with safe_open(str(checkpoint / ckpt.LORA), "pt") as f:
            saved_digest = (f.metadata() or {}).get(STATE_DIGEST)
        if exported_digest is not None and saved_digest is not None:
            return exported_digest == saved_digest
        exported = load_file(str(output_dir / adapter_file))
        saved = load_file(str(checkpoint / ckpt.LORA))
    except (OSError, SafetensorError):
        return False
    # the export carries diffusers' "transformer." prefix on the peft keys (a checkpoint may or may not)
    exported, saved = _unprefixed(exported), _unprefixed(saved)
    return exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


def _unprefixed(tensors: dict) -> dict:
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def remaining_work(output_dir: Path, checkpoint: Path, step: int, max_steps: int,
                   adapter_file: str = LORA_FILE) -> Remaining:
    """What a resume from ``checkpoint`` (at ``step``) has left to do under ``train.max_steps``.

    Past ``max_steps`` with its LoRA exported there is nothing to do; without the export, finishing would
    write a LoRA of more steps than ``config.yaml`` records: refused (raise ``train.max_steps`` instead)."""
    if step < max_steps:
        return Remaining.TRAIN
    if exported_from(output_dir, checkpoint, adapter_file):
        return Remaining.NOTHING
    if step == max_steps:
        return Remaining.EXPORT
    raise UserError(f"--resume: checkpoint {checkpoint} is at step {step}, past train.max_steps {max_steps}, and "
                    f"its LoRA was not exported: set train.max_steps to {step} to export it, or higher to train on")


def nothing_to_do(output_dir: Path, step: int, max_steps: int, adapter_file: str = LORA_FILE) -> str:
    """The message of a resume that finds its run complete (exit 0: a script that always resumes is done)."""
    more = f"train.max_steps is {max_steps}" + (" (lower than the run's steps)" if max_steps < step else "")
    return (f"nothing to do: the run in {output_dir} is complete at step {step} ({more}) and its LoRA "
            f"{output_dir / adapter_file} is of that step; to train further, raise train.max_steps "
            f"(e.g. --set train.max_steps={step * 2}) and resume again")
