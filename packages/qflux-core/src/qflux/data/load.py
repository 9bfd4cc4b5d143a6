"""``load_sample``: decode a ``SampleRecord`` into a resized ``EditSample``."""

from __future__ import annotations

from PIL import Image

from qflux.config.schema import DataConfig
from qflux.data.images import open_mask, open_rgb
from qflux.data.records import SampleRecord
from qflux.data.resize import FULL, Placement, plan_control, plan_target, plan_vl
from qflux.errors import DataError
from qflux.types import ConditionSizing, EditSample


def place(image: Image.Image, placement: Placement, size: tuple[int, int] | None = None) -> Image.Image:
    """Cut ``placement.box`` out of ``image`` and resize it to ``size`` (default ``placement.size``) with
    LANCZOS in one resampling step (the box may fall between pixels, so nothing is rounded twice)."""
    size = size or placement.size
    if placement.box == FULL and image.size == tuple(size):
        return image.copy()
    w, h = image.size
    left, top, right, bottom = placement.box
    return image.resize(size, Image.Resampling.LANCZOS, box=(left * w, top * h, right * w, bottom * h))


def load_sample(record: SampleRecord, data: DataConfig, sizing: ConditionSizing | None = None) -> EditSample:
    """Decode and resize one sample; target, mask and same-aspect controls share one geometry.

    Target: normalised to RGB (``qflux.data.images``), its centred box of the aspect ``plan_size`` chooses
    resized with LANCZOS. Mask: must have the target's size; the target's box and size, mode "L". Controls:
    one of the target's aspect gets the target's box, any other its own centred box; the size follows
    ``data.control_resolution`` and ``sizing``, the trainer's pipeline rule (``qflux.data.resize``).
    ``vl_controls``: the VL encoder's copies when the rule or ``data.vl_resolution`` sizes them apart (else
    empty: the VL encoder sees the controls). Prompt: surrounding
    whitespace stripped (None becomes ""). ``DataError`` names the file of an unreadable image.
    """
    target = placement = None
    if record.target is not None:
        original = open_rgb(record.target, "target")
        placement = plan_target(*original.size, data)
        target = place(original, placement)
    controls, vl_controls = [], []
    for i, ref in enumerate(record.controls):
        image = open_rgb(ref, "control" if i == 0 else f"control_{i}")
        own = plan_control(*image.size, data, placement, sizing)
        controls.append(place(image, own))
        vl_size = plan_vl(own, data, sizing)
        if vl_size is not None:
            vl_controls.append(controls[-1] if vl_size == own.size else place(image, own, vl_size))
    mask = None
    if record.mask is not None and placement is not None:
        raw = open_mask(record.mask)
        if raw.size != original.size:
            raise DataError(
                f"{record.mask.describe()}: the mask is {raw.size[0]}x{raw.size[1]} but the target "
                f"{record.target.describe()} is {original.size[0]}x{original.size[1]}; masks must match the target"
            )
        mask = place(raw, placement)
    return EditSample(
        key=record.key,
        prompt=(record.prompt or "").strip(),
        target=target,
        controls=controls,
        mask=mask,
        files=record.files,
        vl_controls=vl_controls,
    )
