"""Validation sampling: fixed prompts / controls / seeds rendered with the current LoRA into a PNG grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from qflux.config.schema import QfluxConfig
from qflux.types import EditSample, ModelBundle, SampleRequest


@dataclass
class ValidationCase:
    request: SampleRequest
    target: Image.Image | None  # shown beside the sample when known


def cases_from_config(config: QfluxConfig, holdout: list[EditSample]) -> list[ValidationCase]:
    """``validation.samples`` (control paths + prompt) then the first ``validation.from_holdout`` held-out
    samples. Controls are resized like training data; the output size follows the first control (or the
    held-out target)."""
    from qflux.data import load_sample
    from qflux.data.records import FileImage, SampleRecord

    v = config.validation
    cases: list[ValidationCase] = []
    for i, spec in enumerate(v.samples):
        target = spec.target or (spec.control[0] if spec.control else None)  # sets the output size
        record = SampleRecord(key=f"validation-{i}", prompt=spec.prompt,
                              target=FileImage(Path(target)) if target else None,
                              controls=tuple(FileImage(Path(c)) for c in spec.control))
        sample = load_sample(record, config.data)
        width, height = sample.target.size if sample.target is not None else _default_size(config)
        cases.append(ValidationCase(
            SampleRequest(prompt=spec.prompt, controls=sample.controls, height=height, width=width, steps=v.steps,
                          seed=v.seed + i, guidance=v.guidance, true_cfg=v.true_cfg, negative_prompt=spec.negative_prompt),
            sample.target if spec.target else None,
        ))
    for j, sample in enumerate(holdout[: v.from_holdout]):
        width, height = sample.target.size
        cases.append(ValidationCase(
            SampleRequest(prompt=sample.prompt, controls=sample.controls, height=height, width=width, steps=v.steps,
                          seed=v.seed + len(v.samples) + j, guidance=v.guidance, true_cfg=v.true_cfg),
            sample.target,
        ))
    return cases


def _default_size(config: QfluxConfig) -> tuple[int, int]:
    r = config.data.resolution
    if isinstance(r, int):
        return r, r
    h, w = r if isinstance(r, tuple) else r[0]
    return w, h


def render(hook: Any, bundle: ModelBundle, cases: list[ValidationCase]) -> list[Image.Image]:
    images = []
    for case in cases:
        image = hook.qflux_sample(bundle=bundle, request=case.request)
        if image is None:
            raise RuntimeError(f"no plugin implements qflux_sample for trainer '{bundle.trainer.name}'")
        images.append(image)
    return images


def grid(cases: list[ValidationCase], images: list[Image.Image], cell: int = 256) -> Image.Image:
    """One row per case: controls | sample | target, each scaled to ``cell`` pixels high."""
    rows = []
    for case, image in zip(cases, images):
        tiles = [*case.request.controls, image] + ([case.target] if case.target is not None else [])
        tiles = [t.convert("RGB").resize((max(1, round(t.width * cell / t.height)), cell)) for t in tiles]
        row = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), cell), "white")
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width + 4
        rows.append(row)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 4 * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 4
    return out


def save_grid(output_dir: Path, step: int, image: Image.Image) -> Path:
    path = output_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
