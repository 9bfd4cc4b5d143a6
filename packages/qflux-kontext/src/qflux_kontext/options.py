"""The ``kontext`` trainer's own config keys (``model.options``), validated by qflux's preflight with the same
"did you mean" errors as the core's keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class KontextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # FLUX.1 Kontext-dev is guidance-distilled: the transformer embeds a guidance value. Training commonly feeds
    # 1.0; inference uses FluxKontextPipeline's guidance_scale (2.5 by default).
    guidance: float = 1.0  # the guidance embedding during training (and for the validation loss)
    sample_guidance: float = 2.5  # validation images and `qflux sample` (its --guidance overrides it)
