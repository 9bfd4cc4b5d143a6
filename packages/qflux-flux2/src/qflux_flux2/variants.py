"""The two FLUX.2 trainers and what distinguishes them (light: no torch import).

==============  ============================  ===================  ====================  ===============  =========
trainer         real model                    pipeline             text encoder          hidden states    guidance
==============  ============================  ===================  ====================  ===============  =========
``flux2-dev``   black-forest-labs/FLUX.2-dev  Flux2Pipeline        Mistral3 (Pixtral     layers 10,20,30  embedded
                                                                   processor, system                      (distilled)
                                                                   message)
``flux2-klein`` FLUX.2-klein-base-4B / -9B    Flux2KleinPipeline   Qwen3 (chat template, layers 9,18,27   true CFG
                                                                   thinking off)                          at inference
==============  ============================  ===================  ====================  ===============  =========

Both: ``Flux2Transformer2DModel`` on 128 packed channels (32 latent channels of ``AutoencoderKLFlux2``, 2x2
patchified, batch-norm normalised), 4-axis RoPE ids ``(t, h, w, l)`` with the target at ``t = 0`` and reference i
at ``t = 10 + 10 * i`` (``_prepare_image_ids``), prompts padded to 512 tokens, references resized only when above
1024 x 1024 pixels and floored to multiples of 16 (``ConditionSizing(shrink_only=True)``), the empirical-mu
timestep shift (``compute_empirical_mu``). The pipelines take any number of references; ``max_controls``
caps what a sample may carry (each reference adds its tokens to every attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from qflux.plugin_api import ConditionSizing, MemoryProfile, TrainerInfo

FAMILY = "flux2"
REFERENCE_AREA = 1024 * 1024  # Flux2Pipeline.__call__: a reference above this area is shrunk to it
MULTIPLE = 16  # vae_scale_factor * 2: the pipelines floor reference sides to it
MAX_REFERENCES = 10  # the RoPE time axis: 10 references reach t = 100; the pipelines set no limit


@dataclass(frozen=True)
class Flux2Variant:
    """One trainer: its registration and the switches encode / predict / sample read."""

    name: str
    description: str
    pipeline: str  # "diffusers.<Class>"
    default_model: str
    text_layers: tuple[int, ...]  # the text encoder's hidden states stacked into the prompt embedding
    guidance_embeds: bool  # FLUX.2 [dev]: a guidance-distilled transformer with a guidance embedding

    @property
    def pipeline_class_name(self) -> str:
        return self.pipeline.rsplit(".", 1)[-1]

    @property
    def info(self) -> TrainerInfo:
        return TrainerInfo(
            name=self.name,
            family=FAMILY,
            description=self.description,
            pipeline=self.pipeline,
            default_model=self.default_model,
            max_controls=MAX_REFERENCES,
            condition_sizing=ConditionSizing(area=REFERENCE_AREA, multiple=MULTIPLE, shrink_only=True),
            # measured: benchmarks/calibrate_activations.py (builtin:tiny, LoRA on the default targets)
            memory=MemoryProfile(activations=(("Flux2TransformerBlock", 16.8), ("Flux2SingleTransformerBlock", 16.3)),
                                 half=(("Flux2TransformerBlock", 23.4), ("Flux2SingleTransformerBlock", 20.5)),
                                 text_tokens=512),
        )


VARIANTS: dict[str, Flux2Variant] = {
    v.name: v
    for v in (
        Flux2Variant(
            name="flux2-dev",
            description="FLUX.2 [dev] (Flux2Transformer2DModel, Mistral3 prompt encoder, guidance embedding; 0-10 references)",
            pipeline="diffusers.Flux2Pipeline",
            default_model="black-forest-labs/FLUX.2-dev",
            text_layers=(10, 20, 30),
            guidance_embeds=True,
        ),
        Flux2Variant(
            name="flux2-klein",
            description="FLUX.2 [klein] base 4B/9B (Qwen3 prompt encoder, true CFG at inference; 0-10 references)",
            pipeline="diffusers.Flux2KleinPipeline",
            default_model="black-forest-labs/FLUX.2-klein-base-4B",
            text_layers=(9, 18, 27),
            guidance_embeds=False,
        ),
    )
}


def variant_named(name: str) -> Flux2Variant:
    """The variant called ``name``; ``ValueError`` listing the known names otherwise."""
    variant = VARIANTS.get(name)
    if variant is None:
        raise ValueError(f"unknown FLUX.2 trainer '{name}' (known: {', '.join(VARIANTS)})")
    return variant
