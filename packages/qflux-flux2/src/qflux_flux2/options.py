"""The FLUX.2 trainers' own config keys (``model.options``), validated by qflux's preflight with the same
"did you mean" errors as the core's keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Flux2Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # flux2-dev is guidance-distilled: its transformer embeds a guidance value. Training feeds 1.0 (as for
    # FLUX.1 and in the peers' FLUX.2 recipes); Flux2Pipeline samples with guidance_scale 4.0 by default.
    # flux2-klein has no guidance embedding: `guidance` is ignored in training, and `sample_guidance` is
    # Flux2KleinPipeline's guidance_scale, the true-CFG scale against the empty prompt (> 1: CFG on).
    guidance: float = 1.0
    sample_guidance: float = 4.0
    # the step count compute_empirical_mu assumes for `train.timestep_sampling: resolution_shift` (FLUX.2's
    # shift depends on the inference step count too; the pipelines' default is 50)
    shift_steps: int = Field(50, ge=1)
    # FLUX.2 [klein] 4B / 9B exist as step-distilled checkpoints (is_distilled in model_index.json, 4 steps, no
    # CFG) and as base checkpoints. Training a LoRA on the distilled ones undoes the distillation: refused
    # unless set.
    allow_distilled: bool = False
