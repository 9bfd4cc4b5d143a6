"""The folder layout (DESIGN section 5)::

    training_images/<stem>.png|jpg|jpeg|webp   target image (upper-case extensions too)
    training_images/<stem>.txt                 instruction prompt
    control_images/<stem>.<ext>                main control image (absent: text-to-image sample)
    control_images/<stem>_control_1.<ext>      extra controls (_2, _3 ...)
    control_images/<stem>_mask.<ext>           edit mask (white = edited region)

Records are sorted by stem. Two files for one slot (``a.png`` and ``a.jpg``) are an error; controls, masks
and prompts without a target are warnings here (``open_records`` skips them) and fatal before a training run
(``qflux.data.check.validate_dataset``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from qflux.data.images import OTHER_IMAGE_SUFFIXES, is_image_file
from qflux.data.records import DataProblem, FileImage, SampleRecord, SourceScan

TARGET_DIR = "training_images"
CONTROL_DIR = "control_images"
_CONTROL_RE = re.compile(r"^(?P<stem>.+)_control_(?P<index>\d+)$")
_MASK_SUFFIX = "_mask"


@dataclass
class _Slots:
    """The files found for one stem."""

    targets: list[Path] = field(default_factory=list)
    prompts: list[Path] = field(default_factory=list)
    controls: dict[int, list[Path]] = field(default_factory=lambda: defaultdict(list))
    masks: list[Path] = field(default_factory=list)


def is_folder_dataset(root: Path) -> bool:
    return (root / TARGET_DIR).is_dir()


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _unsupported(path: Path) -> DataProblem:
    return DataProblem(str(path), f"unsupported image type '{path.suffix}': convert it to PNG, JPEG or WebP")


def scan_folder(root: Path) -> SourceScan:
    """Find every sample of the folder layout under ``root`` (see the module docstring)."""
    scan = SourceScan(description=f"folder {root}")
    slots: dict[str, _Slots] = defaultdict(_Slots)

    for path in _visible_files(root / TARGET_DIR):
        if is_image_file(path.name):
            slots[path.stem].targets.append(path)
        elif path.suffix.lower() == ".txt":
            slots[path.stem].prompts.append(path)
        elif path.suffix.lower() in OTHER_IMAGE_SUFFIXES:
            scan.warnings.append(_unsupported(path))

    target_stems = {stem for stem, s in slots.items() if s.targets}
    for path in _visible_files(root / CONTROL_DIR):
        if not is_image_file(path.name):
            if path.suffix.lower() in OTHER_IMAGE_SUFFIXES:
                scan.warnings.append(_unsupported(path))
            continue
        stem = path.stem
        match = _CONTROL_RE.match(stem)
        if stem.endswith(_MASK_SUFFIX) and stem not in target_stems:
            slots[stem[: -len(_MASK_SUFFIX)]].masks.append(path)
        elif match and stem not in target_stems:
            slots[match["stem"]].controls[int(match["index"])].append(path)
        else:
            slots[stem].controls[0].append(path)

    for stem in sorted(slots):
        record = _record(stem, slots[stem], root, scan)
        if record is not None:
            scan.records.append(record)
    return scan


def _record(stem: str, s: _Slots, root: Path, scan: SourceScan) -> SampleRecord | None:
    def duplicates(paths: list[Path], what: str) -> bool:
        if len(paths) > 1:
            names = ", ".join(p.name for p in sorted(paths))
            scan.errors.append(
                DataProblem(str(sorted(paths)[0]), f"duplicate {what} for '{stem}': {names}; keep only one")
            )
            return True
        return False

    bad = duplicates(s.targets, "target image")
    bad |= duplicates(s.masks, "mask")
    for index in sorted(s.controls):
        bad |= duplicates(s.controls[index], "main control" if index == 0 else f"control {index}")

    if not s.targets:
        for path in [*s.prompts, *s.masks, *(p for ps in s.controls.values() for p in ps)]:
            scan.warnings.append(
                DataProblem(str(path), f"no target image training_images/{stem}.png (or .jpg/.webp) for this file: "
                                       "add the target or remove the file")
            )
        return None

    indexes = sorted(s.controls)
    contiguous = indexes == list(range(indexes[0], indexes[0] + len(indexes))) if indexes else True
    if indexes and (not contiguous or indexes[0] > 1):
        scan.warnings.append(
            DataProblem(
                str(s.controls[indexes[-1]][0]),
                f"control numbering of '{stem}' has a gap ({', '.join(map(str, indexes))}); "
                "controls are used in order: rename them _control_1, _control_2 ...",
            )
        )
    elif indexes and indexes[0] == 1:
        scan.warnings.append(
            DataProblem(
                str(s.controls[1][0]),
                f"'{stem}' has extra controls but no main control control_images/{stem}.png; "
                "the first extra control is used as the main one",
            )
        )
    if bad:
        return None

    prompt_file = s.prompts[0] if s.prompts else None
    prompt = None
    if prompt_file is None:
        scan.warnings.append(
            DataProblem(
                str(root / TARGET_DIR / f"{stem}.txt"),
                f"missing prompt: add training_images/{stem}.txt with the edit instruction",
            )
        )
    else:
        try:
            prompt = prompt_file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            scan.errors.append(DataProblem(str(prompt_file), "the prompt file is not UTF-8 text; re-save it as UTF-8"))
            return None
        except OSError as err:
            scan.errors.append(DataProblem(str(prompt_file), f"cannot read the prompt file ({err.strerror or err})"))
            return None
        if not prompt.strip():
            scan.warnings.append(DataProblem(str(prompt_file), "empty prompt: write the edit instruction in it"))
    return SampleRecord(
        key=stem,
        prompt=prompt,
        target=FileImage(s.targets[0]),
        controls=tuple(FileImage(s.controls[i][0]) for i in indexes),
        mask=FileImage(s.masks[0]) if s.masks else None,
        origin=str(s.targets[0]),
        prompt_file=prompt_file,
    )
