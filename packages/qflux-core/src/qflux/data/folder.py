"""The folder layouts (DESIGN section 5, docs/data.md).

The qflux layout, ``data.path`` = ROOT::

    training_images/<stem>.png|jpg|jpeg|webp   target image (upper-case extensions too)
    training_images/<stem>.txt                 instruction prompt
    control_images/<stem>.<ext>                main control image (absent: text-to-image sample)
    control_images/<stem>_control_1.<ext>      extra controls (_2, _3 ...)
    control_images/<stem>_mask.<ext>           edit mask (white = edited region)

Separate folders (ai-toolkit's ``folder_path`` + ``control_path``, musubi-tuner's ``image_directory`` +
``control_directory``): ``data.path`` is the folder of targets (``<stem>.<ext>`` + ``<stem>.txt``) and
``data.control_path`` one control folder (``<stem>.<ext>``, or musubi's ``<stem>_0.<ext>``, ``<stem>_1.<ext>``
... for several controls) or a list of folders, one per control slot (``<stem>.<ext>`` in each).
``data.mask_path`` (either layout) is a folder of masks ``<stem>.<ext>``.

Records are sorted by stem. Two files for one slot are an error; controls, masks and prompts without a target
are warnings here (``open_records`` skips them) and fatal before a training run
(``qflux.data.check.validate_dataset``). Files and folders that are not read (subfolders, other file types, a
caption put among the controls) are listed in ``SourceScan.skipped`` with the reason: nothing is dropped
without a word; a folder inside the dataset folder holding images named like the targets is a warning (fatal
before a run): it is almost always a misnamed control or mask folder. Folders near the dataset holding images named like the targets are listed in
``SourceScan.unread``: a control folder named ``controls/`` is the usual reason for a dataset without controls.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qflux.data.images import OTHER_IMAGE_SUFFIXES, is_image_file
from qflux.data.records import DataProblem, FileImage, SampleRecord, SourceScan, UnreadFolder

TARGET_DIR = "training_images"
CONTROL_DIR = "control_images"
_CONTROL_RE = re.compile(r"^(?P<stem>.+)_control_(?P<index>\d+)$")
_NUMBERED_RE = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)$")  # musubi-tuner: <stem>_0, <stem>_1 ...
_MASK_SUFFIX = "_mask"
_NOT_READ = "not an image (.png/.jpg/.jpeg/.webp) or a .txt prompt: not read"


@dataclass
class _Slots:
    """The files found for one stem."""

    targets: list[Path] = field(default_factory=list)
    prompts: list[Path] = field(default_factory=list)
    controls: dict[int, list[Path]] = field(default_factory=lambda: defaultdict(list))
    masks: list[Path] = field(default_factory=list)
    stray_caption: Path | None = None  # a <stem>.txt put among the controls


@dataclass(frozen=True)
class _Names:
    """How the messages of one layout name its folders (``targets`` / ``controls``: folder labels)."""

    targets: str
    controls: tuple[str, ...]
    qflux: bool  # the training_images/ + control_images/ layout

    def control_file(self, stem: str, index: int) -> str:
        if self.qflux:
            return f"{self.controls[0]}/{stem}{'' if index == 0 else f'_control_{index}'}.png"
        if len(self.controls) > 1:
            return f"{self.controls[index]}/{stem}.png"
        return f"{self.controls[0]}/{stem}_{index}.png"


def is_folder_dataset(root: Path) -> bool:
    return (root / TARGET_DIR).is_dir()


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible ``(files, subfolders)`` of ``folder``, sorted (hidden names such as .DS_Store are ignored)."""
    if not folder.is_dir():
        return [], []
    visible = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in visible if p.is_file()], [p for p in visible if p.is_dir()]


def _siblings(folder: Path) -> list[Path]:
    """The other visible folders next to ``folder`` (none when its parent cannot be listed)."""
    try:
        return [f for f in _entries(folder.parent)[1] if f.resolve() != folder.resolve()]
    except OSError:
        return []


def _unsupported(path: Path) -> DataProblem:
    return DataProblem(str(path), f"unsupported image type '{path.suffix}': convert it to PNG, JPEG or WebP")


def _count_images(folder: Path, recursive: bool) -> tuple[int, set[str]]:
    """``(number of image files, their stems)`` in ``folder``; a folder that cannot be listed counts as empty
    (it is only looked at to report it, never read)."""
    try:
        files = list(folder.rglob("*") if recursive else folder.iterdir())
    except OSError:
        return 0, set()
    stems = [p.stem for p in files if p.is_file() and not p.name.startswith(".") and is_image_file(p.name)]
    return len(stems), set(stems)


def _matching(stems: set[str], targets: set[str]) -> int:
    """How many image stems name a target, directly or with a control/mask/number suffix."""
    def base(stem: str) -> str:
        for pattern in (_CONTROL_RE, _NUMBERED_RE):
            match = pattern.match(stem)
            if match and stem not in targets:
                return match["stem"]
        return stem[: -len(_MASK_SUFFIX)] if stem.endswith(_MASK_SUFFIX) and stem not in targets else stem

    return sum(1 for s in stems if base(s) in targets)


def _skip_subfolders(subfolders: Iterable[Path], scan: SourceScan, inside: str) -> None:
    for sub in subfolders:
        images, _ = _count_images(sub, recursive=True)
        try:
            files = sum(1 for p in sub.rglob("*") if p.is_file() and not p.name.startswith("."))
        except OSError:  # cannot be listed: still not read, and said so
            files = 1
        if files:
            scan.skipped.append(DataProblem(
                str(sub), f"subfolder not read ({images} image(s), {files} file(s)): only the files directly in "
                          f"{inside}/ are read; move them up into {inside}/ or delete the folder"))


def _unread(folders: Iterable[Path], targets: set[str]) -> list[UnreadFolder]:
    found = []
    for folder in folders:
        images, stems = _count_images(folder, recursive=False)
        if images:
            found.append(UnreadFolder(folder, images, _matching(stems, targets)))
    return found


def _read_targets(folder: Path, label: str, slots: dict[str, _Slots], scan: SourceScan) -> set[str]:
    """Targets and prompts of ``folder`` into ``slots``; returns the target stems."""
    files, subfolders = _entries(folder)
    for path in files:
        if is_image_file(path.name):
            slots[path.stem].targets.append(path)
        elif path.suffix.lower() == ".txt":
            slots[path.stem].prompts.append(path)
        elif path.suffix.lower() in OTHER_IMAGE_SUFFIXES:
            scan.warnings.append(_unsupported(path))
        else:
            scan.skipped.append(DataProblem(str(path), _NOT_READ))
    _skip_subfolders(subfolders, scan, label)
    return {stem for stem, s in slots.items() if s.targets}


def _non_image(path: Path, slots: dict[str, _Slots], scan: SourceScan, where: str, targets_label: str) -> None:
    """A file among controls or masks that is no image: a caption put there, another type, or a stray file."""
    if path.suffix.lower() in OTHER_IMAGE_SUFFIXES:
        scan.warnings.append(_unsupported(path))
    elif path.suffix.lower() == ".txt" and path.stem in slots and slots[path.stem].targets:
        slots[path.stem].stray_caption = path
        if slots[path.stem].prompts:
            scan.skipped.append(DataProblem(str(path), f"a caption in {where}/ is not read: the prompt of "
                                                       f"'{path.stem}' is {targets_label}/{path.stem}.txt"))
    elif path.suffix.lower() == ".txt":
        scan.skipped.append(DataProblem(str(path), f"a .txt in {where}/ is not read: prompts go next to the "
                                                   f"target, {targets_label}/<stem>.txt"))
    else:
        scan.skipped.append(DataProblem(str(path), "not an image (.png/.jpg/.jpeg/.webp): not read"))


def _read_masks(folder: Path, slots: dict[str, _Slots], scan: SourceScan, names: _Names) -> None:
    files, subfolders = _entries(folder)
    for path in files:
        if is_image_file(path.name):
            slots[path.stem].masks.append(path)
        else:
            _non_image(path, slots, scan, folder.name, names.targets)
    _skip_subfolders(subfolders, scan, folder.name)


def _records(slots: dict[str, _Slots], scan: SourceScan, names: _Names) -> SourceScan:
    for stem in sorted(slots):
        record = _record(stem, slots[stem], scan, names)
        if record is not None:
            scan.records.append(record)
    return scan


def scan_folder(root: Path, mask_dir: Path | None = None) -> SourceScan:
    """Find every sample of the qflux layout under ``root`` (see the module docstring); masks also come from
    ``mask_dir`` (``data.mask_path``) when given."""
    scan = SourceScan(description=f"folder {root}",
                      control_hint=f"add {CONTROL_DIR}/<stem>.png (the image before the edit) for each target")
    names = _Names(TARGET_DIR, (CONTROL_DIR,), qflux=True)
    slots: dict[str, _Slots] = defaultdict(_Slots)
    target_stems = _read_targets(root / TARGET_DIR, TARGET_DIR, slots, scan)

    files, subfolders = _entries(root / CONTROL_DIR)
    for path in files:
        if not is_image_file(path.name):
            _non_image(path, slots, scan, CONTROL_DIR, TARGET_DIR)
            continue
        stem = path.stem
        match = _CONTROL_RE.match(stem)
        if stem.endswith(_MASK_SUFFIX) and stem not in target_stems:
            slots[stem[: -len(_MASK_SUFFIX)]].masks.append(path)
        elif match and stem not in target_stems:
            slots[match["stem"]].controls[int(match["index"])].append(path)
        else:
            slots[stem].controls[0].append(path)
    _skip_subfolders(subfolders, scan, CONTROL_DIR)
    if mask_dir is not None:
        _read_masks(mask_dir, slots, scan, names)

    # what else is in the dataset folder: images at its top and folders of images are not read
    top_files, top_folders = _entries(root)
    for path in top_files:
        if is_image_file(path.name):
            scan.skipped.append(DataProblem(str(path), f"an image directly in the dataset folder is not read: "
                                                       f"targets go in {TARGET_DIR}/, controls in {CONTROL_DIR}/"))
    read = {TARGET_DIR, CONTROL_DIR}
    others = [f for f in top_folders if f.name not in read and (mask_dir is None or f.resolve() != mask_dir.resolve())]
    nested = [*_entries(root / TARGET_DIR)[1], *subfolders]
    scan.unread = _unread([*others, *nested], target_stems)
    for folder in scan.unread:
        if folder.path in others:
            # a folder of images named like the targets inside the dataset folder was meant to be read (a
            # misnamed control or mask folder): a problem, not a note
            found = DataProblem(str(folder.path), _unread_reason(folder, qflux=True))
            (scan.warnings if folder.matching else scan.skipped).append(found)
    return _records(slots, scan, names)


def _unread_reason(folder: UnreadFolder, qflux: bool) -> str:
    if folder.matching:
        fix = (f"if it holds the controls, rename it {CONTROL_DIR}/ (or set data.control_path to it and "
               f"data.path to {TARGET_DIR}/); "
               if qflux else "if it holds the controls, set data.control_path to it; ")
        return (f"folder not read: {folder.matching} of its {folder.images} image(s) are named like the targets; "
                f"{fix}masks: set data.mask_path to it" + ("; otherwise move it out of the dataset folder"
                                                            if qflux else ""))
    return (f"folder not read ({folder.images} image(s)): the folder layout reads only {TARGET_DIR}/ and "
            f"{CONTROL_DIR}/")


def scan_separate(targets: Path, controls: Sequence[Path], mask_dir: Path | None = None) -> SourceScan:
    """Find every sample of the separate-folders layout (see the module docstring)."""
    several = len(controls) > 1
    scan = SourceScan(
        description=f"folder {targets}",
        control_hint=(f"add <stem>.png for each target to every data.control_path folder ("
                      f"{', '.join(c.name for c in controls)})" if controls else "set data.control_path"),
    )
    names = _Names(targets.name, tuple(c.name for c in controls), qflux=False)
    slots: dict[str, _Slots] = defaultdict(_Slots)
    target_stems = _read_targets(targets, targets.name, slots, scan)

    for slot, folder in enumerate(controls):
        files, subfolders = _entries(folder)
        numbered: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
        for path in files:
            if not is_image_file(path.name):
                _non_image(path, slots, scan, folder.name, targets.name)
                continue
            stem = path.stem
            match = _NUMBERED_RE.match(stem)
            if not several and stem not in target_stems and match and match["stem"] in target_stems:
                numbered[match["stem"]][int(match["index"])].append(path)
            else:
                slots[stem].controls[slot].append(path)
        for stem, by_number in numbered.items():
            if slots[stem].controls.get(0):
                both = ", ".join(p.name for p in [*slots[stem].controls[0],
                                                  *(p for i in sorted(by_number) for p in sorted(by_number[i]))])
                scan.errors.append(DataProblem(
                    str(slots[stem].controls[0][0]),
                    f"'{stem}' has both a control named like the target and numbered ones in {folder.name}/ "
                    f"({both}); name one control {stem}.png, several {stem}_0.png, {stem}_1.png ..."))
                continue
            for position, number in enumerate(sorted(by_number)):  # used in the order of their numbers
                slots[stem].controls[position].extend(by_number[number])  # two files, one number: duplicates
        _skip_subfolders(subfolders, scan, folder.name)
    if mask_dir is not None:
        _read_masks(mask_dir, slots, scan, names)

    own = {targets.resolve(), *(c.resolve() for c in controls), *([mask_dir.resolve()] if mask_dir else [])}
    siblings = [f for f in _siblings(targets) if f.resolve() not in own]
    inside = _entries(targets)[1]
    scan.unread = [u for u in _unread([*inside, *siblings], target_stems) if u.matching or u.path in inside]
    for folder in scan.unread:
        if folder.path not in inside and folder.matching:
            scan.skipped.append(DataProblem(str(folder.path), _unread_reason(folder, qflux=False)))
    return _records(slots, scan, names)


def _record(stem: str, s: _Slots, scan: SourceScan, names: _Names) -> SampleRecord | None:
    def duplicates(paths: list[Path], what: str) -> bool:
        if len(paths) > 1:
            listed = ", ".join(p.name for p in sorted(paths))
            scan.errors.append(
                DataProblem(str(sorted(paths)[0]), f"duplicate {what} for '{stem}': {listed}; keep only one")
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
                DataProblem(str(path), f"no target image {names.targets}/{stem}.png (or .jpg/.webp) for this file: "
                                       "add the target or remove the file")
            )
        return None

    indexes = sorted(i for i in s.controls if s.controls[i])
    contiguous = indexes == list(range(indexes[0], indexes[0] + len(indexes))) if indexes else True
    if not names.qflux and indexes and indexes != list(range(len(indexes))):  # one folder per slot: a hole
        missing = next(i for i in range(indexes[-1]) if i not in indexes)
        scan.warnings.append(DataProblem(
            str(s.controls[indexes[-1]][0]),
            f"'{stem}' has no control {names.control_file(stem, missing)} but a later one: controls are used "
            "in order, add the missing one"))
    elif indexes and (not contiguous or indexes[0] > 1):
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
                f"'{stem}' has extra controls but no main control {names.control_file(stem, 0)}; "
                "the first extra control is used as the main one",
            )
        )
    if bad:
        return None

    prompt_file = s.prompts[0] if s.prompts else None
    prompt = None
    if prompt_file is None:
        where = f"{names.targets}/{stem}.txt"
        stray = (f"; {s.stray_caption.parent.name}/{s.stray_caption.name} is not read there: move it to {where}"
                 if s.stray_caption is not None else "")
        scan.warnings.append(
            DataProblem(
                str(s.targets[0].parent / f"{stem}.txt"),
                f"missing prompt: add {where} with the edit instruction{stray}",
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


def guess_control_folders(targets: Path) -> list[Path]:
    """Folders next to (or inside) a flat folder of targets that hold images named like them: where the
    controls of a separate-folders dataset probably are (for the hint of a folder without training_images/)."""
    files, inside = _entries(targets)
    stems = {p.stem for p in files if is_image_file(p.name)}
    if not stems:
        return []
    return [u.path for u in _unread([*inside, *_siblings(targets)], stems) if u.matching]
