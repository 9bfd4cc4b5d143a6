"""Validation sampling: fixed prompts / controls / seeds rendered with the current LoRA into a PNG grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from qflux.config.schema import QfluxConfig
from qflux.types import ConditionSizing, EditSample, ModelBundle, SampleRequest


@dataclass
class ValidationCase:
    request: SampleRequest
    target: Image.Image | None  # shown beside the sample when known
    mask: Image.Image | None = None  # white = edited (held-out samples with a mask): the fidelity metrics use it
    # Trainer.encode_request's encoding of ``request`` (prompts, controls; tensors on CPU), made before the
    # transformer loaded (``encode_cases``); None: the trainer encodes the raw request in Trainer.sample
    encoded: Any = None


def cases_from_config(config: QfluxConfig, holdout: list[EditSample],
                      sizing: ConditionSizing | None = None) -> list[ValidationCase]:
    """``validation.samples`` (control paths + prompt) then the first ``validation.from_holdout`` held-out
    samples. Sizes are planned as for training data (``load_sample`` with the trainer's ``sizing``): the
    output gets the size a target of the first control's (or the given target's) size trains at, the controls
    the size training fed them (by default the pipeline's); no image: ``default_size``."""
    from qflux.data import load_sample
    from qflux.data.records import FileImage, SampleRecord

    v = config.validation
    cases: list[ValidationCase] = []
    for i, spec in enumerate(v.samples):
        target = spec.target or (spec.control[0] if spec.control else None)  # sets the output size
        record = SampleRecord(key=f"validation-{i}", prompt=spec.prompt,
                              target=FileImage(Path(target)) if target else None,
                              controls=tuple(FileImage(Path(c)) for c in spec.control))
        sample = load_sample(record, config.data, sizing)
        width, height = sample.target.size if sample.target is not None else _default_size(config)
        cases.append(ValidationCase(
            SampleRequest(prompt=spec.prompt, controls=sample.controls, height=height, width=width, steps=v.steps,
                          seed=v.seed + i, true_cfg=v.true_cfg, negative_prompt=spec.negative_prompt,
                          vl_controls=sample.vl_controls),
            sample.target if spec.target else None,
        ))
    for j, sample in enumerate(holdout[: v.from_holdout]):
        width, height = sample.target.size
        cases.append(ValidationCase(
            SampleRequest(prompt=sample.prompt, controls=sample.controls, height=height, width=width, steps=v.steps,
                          seed=v.seed + len(v.samples) + j, true_cfg=v.true_cfg,
                          vl_controls=sample.vl_controls),
            sample.target,
            sample.mask,
        ))
    return cases


def _default_size(config: QfluxConfig) -> tuple[int, int]:
    return config.data.resolution_spec.default_size


def encode_cases(trainer: Any, encoders: Any, cases: list[ValidationCase], model: Any) -> None:
    """Each case's ``encoded``: ``Trainer.encode_request`` of its request, with the loaded ``encoders`` (before
    the transformer loads; the encoders can be freed after)."""
    for case in cases:
        case.encoded = trainer.encode_request(encoders, case.request, model)


def render(bundle: ModelBundle, cases: list[ValidationCase]) -> list[Image.Image]:
    """One image per case: from its encoding (``bundle.encoders`` is then ``Trainer.decoder``'s) when it has one,
    else from the raw request with the whole encoders."""
    return [bundle.trainer.sample(bundle, case.request, encoded=case.encoded) if case.encoded is not None
            else bundle.trainer.sample(bundle, case.request) for case in cases]


GAP = 4  # pixels between tiles and rows
LABEL_HEIGHT = 16  # the text bands above (column names) and below (step, prompt, notes) each row's tiles
FONT_SIZE = 12


def grid(cases: list[ValidationCase], images: list[Image.Image], cell: int = 256, step: int | None = None,
         notes: list[str] | None = None, base: list[Image.Image] | None = None) -> Image.Image:
    """One row per case: controls | sample | target, each scaled to ``cell`` pixels high, with a band above
    naming the columns (reference / sample / target) and one below giving the step, the prompt and the row's
    ``notes`` (e.g. its fidelity figures). ``base``: the base model's image per case (the run's step-0 samples,
    before any training), shown before the sample: controls | base | LoRA | target. PIL's default font: nothing
    to download. The tiles themselves are never drawn on."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=FONT_SIZE)
    rows = []
    for i, (case, image) in enumerate(zip(cases, images)):
        controls = case.request.controls
        names = ["reference" if len(controls) == 1 else f"reference {k + 1}" for k in range(len(controls))]
        before = [base[i]] if base is not None and i < len(base) else []
        tiles = [*controls, *before, image] + ([case.target] if case.target is not None else [])
        names += (["base", "LoRA"] if before else ["sample"]) + (["target"] if case.target is not None else [])
        tiles = [t.convert("RGB").resize((max(1, round(t.width * cell / t.height)), cell)) for t in tiles]
        width = sum(t.width for t in tiles) + GAP * (len(tiles) - 1)
        row = Image.new("RGB", (width, cell + 2 * LABEL_HEIGHT), "white")
        draw = ImageDraw.Draw(row)
        x = 0
        for t, name in zip(tiles, names):
            row.paste(t, (x, LABEL_HEIGHT))
            draw.text((x + 2, 1), _fit(draw, name, t.width - 4, font), fill="black", font=font)
            x += t.width + GAP
        caption = " | ".join(p for p in (f"step {step}" if step is not None else "", case.request.prompt,
                                         (notes[i] if notes and i < len(notes) else "")) if p)
        draw.text((2, LABEL_HEIGHT + cell + 1), _fit(draw, caption, width - 4, font), fill="black", font=font)
        rows.append(row)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + GAP * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + GAP
    return out


def _fit(draw: Any, text: str, width: float, font: Any) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels: a long prompt must not run over the next tile."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def save_grid(output_dir: Path, step: int, image: Image.Image) -> Path:
    path = output_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path, "grid-before-rename")
    return path


def save_image(image: Image.Image, path: Path, point: str) -> None:
    """Write ``image`` to ``path`` atomically: into a temporary file of the same folder (a dot-file, the
    format taken from ``path``'s extension), renamed over ``path`` when complete. A process killed or a disk
    that fills up mid-write leaves ``path`` as it was (absent, or the previous image), never a partial image.
    ``point``: the name of the kill point between the write and the rename (``qflux.killpoints``)."""
    import os
    import tempfile

    from qflux.filemodes import give_normal_mode
    from qflux.killpoints import pause_point

    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
        except OSError as err:  # PIL's failed write names no file: the CLI's message for a full disk names it
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        give_normal_mode(tmp)  # mkstemp's 0600 would survive the rename
        pause_point(point)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
