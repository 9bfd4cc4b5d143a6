"""The image sizes a LoRA was trained with, carried in its safetensors metadata (``qflux.training_sizes``).

A LoRA works best at the sizes it was trained at, and the config given to ``qflux sample`` may be another
one (a 64-px demo config would turn a 900x500 photo into 80x48). So the export records the ``data`` keys that
plan sizes, and ``qflux sample`` plans from them when the LoRA file has them.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from qflux.config.schema import DataConfig
from qflux.errors import UserError

KEY = "qflux.training_sizes"
FIELDS = ("resolution", "resize", "control_resolution", "vl_resolution", "max_aspect")


def sizes_metadata(data: DataConfig) -> dict[str, str]:
    """The metadata entry for ``export_lora(..., extra_metadata=...)``: the sizing keys of ``data`` as JSON."""
    return {KEY: json.dumps(data.model_dump(mode="json", include=set(FIELDS)), sort_keys=True)}


def trained_data(data: DataConfig, metadata: dict[str, str], source: str = "the LoRA") -> DataConfig | None:
    """``data`` with the sizing keys a LoRA's ``metadata`` records; None when it records none (a file from
    another tool, or from before they were written)."""
    raw = metadata.get(KEY)
    if raw is None:
        return None
    try:
        values = json.loads(raw)
        recorded = {k: values[k] for k in FIELDS if k in values}
        return DataConfig.model_validate({**data.model_dump(mode="json"), **recorded})
    except (ValueError, TypeError, ValidationError) as err:
        raise UserError(f"{source}: its {KEY} metadata cannot be read ({err}); pass --width/--height, or "
                        "remove the entry") from err
