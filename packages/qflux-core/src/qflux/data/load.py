"""``load_sample``: decode a ``SampleRecord`` into a resized ``EditSample``."""

from __future__ import annotations

from qflux.config.schema import DataConfig
from qflux.data.images import fit, open_mask, open_rgb
from qflux.data.records import SampleRecord
from qflux.data.resize import plan_control_size, plan_size
from qflux.errors import DataError
from qflux.types import EditSample


def load_sample(record: SampleRecord, data: DataConfig) -> EditSample:
    """Decode and resize one sample.

    Target: normalised to RGB (``qflux.data.images``), center-cropped to the aspect ``plan_size`` chooses and
    resized with LANCZOS. Controls: each keeps its own aspect at its own pixel budget (``plan_control_size``).
    Mask: must have the target's size; it gets the target's crop and size, mode "L". Prompt: surrounding
    whitespace stripped (None becomes ""). ``DataError`` names the file of an unreadable image.
    """
    target = size = None
    if record.target is not None:
        original = open_rgb(record.target, "target")
        size = plan_size(*original.size, data)
        target = fit(original, size)
    controls = []
    for i, ref in enumerate(record.controls):
        image = open_rgb(ref, "control" if i == 0 else f"control_{i}")
        controls.append(fit(image, plan_control_size(*image.size, data, size)))
    mask = None
    if record.mask is not None and record.target is not None:
        raw = open_mask(record.mask)
        if raw.size != original.size:
            raise DataError(
                f"{record.mask.describe()}: the mask is {raw.size[0]}x{raw.size[1]} but the target "
                f"{record.target.describe()} is {original.size[0]}x{original.size[1]}; masks must match the target"
            )
        mask = fit(raw, size)
    return EditSample(
        key=record.key,
        prompt=(record.prompt or "").strip(),
        target=target,
        controls=controls,
        mask=mask,
        files=record.files,
    )
