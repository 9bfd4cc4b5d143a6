"""The three Qwen-Image-Edit trainers and what distinguishes them (light: no torch import).

=================  ===========================  ==========================  ========  ==========  ========  ===========
trainer            real model                   pipeline                    controls  VAE image   VL image  zero_cond_t
=================  ===========================  ==========================  ========  ==========  ========  ===========
``qwen-edit``      Qwen/Qwen-Image-Edit         QwenImageEditPipeline       1         ~1024x1024  the same  no
``qwen-edit-plus`` Qwen/Qwen-Image-Edit-2509    QwenImageEditPlusPipeline   1-3       ~1024x1024  ~384x384  no
``qwen-edit-2511`` Qwen/Qwen-Image-Edit-2511    QwenImageEditPlusPipeline   1-3       ~1024x1024  ~384x384  yes
=================  ===========================  ==========================  ========  ==========  ========  ===========

"VAE image" / "VL image": the sizes at which the pipelines feed each control to the VAE and to the Qwen2.5-VL
encoder (``calculate_dimensions(area, aspect)``, sides multiples of 32): ``QwenImageEditPipeline`` resizes the
control to ~1 MP and gives that one image to both; the plus pipelines resize every control to ~1 MP for the VAE
(``VAE_IMAGE_SIZE``) and to ~384 x 384 for the VL encoder (``CONDITION_IMAGE_SIZE``). ``condition_sizing`` says
so to the data stage, which prepares the controls at those sizes (``data.control_resolution`` /
``data.vl_resolution`` override them). ``zero_cond_t``: the 2511 transformer embeds the condition (control)
tokens at timestep 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from qflux.plugin_api import ConditionSizing, MemoryProfile, TrainerInfo

FAMILY = "qwen-image"
VL_AREA_PLUS = 384 * 384  # diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
VAE_AREA = 1024 * 1024  # QwenImageEditPipeline's calculate_dimensions(1024 * 1024, ...); the plus VAE_IMAGE_SIZE


@dataclass(frozen=True)
class QwenVariant:
    """One trainer: its registration and the switches encode / predict / sample read."""

    name: str
    description: str
    pipeline: str  # "diffusers.<Class>"
    default_model: str
    max_controls: int
    multi_image: bool  # "Picture i: <|vision_start|><|image_pad|><|vision_end|>" per control (plus template)
    vl_area: int | None  # pixel area of the VL encoder's copy of each control; None: the control as given
    zero_cond_t: bool  # condition tokens at t = 0 (transformer config flag, forced on at load)

    @property
    def condition_sizing(self) -> ConditionSizing:
        """The pipeline's condition sizes (``calculate_dimensions``, multiples of 32, no input flooring)."""
        return ConditionSizing(area=VAE_AREA, multiple=32, vl_area=self.vl_area)

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
            max_controls=self.max_controls,
            condition_sizing=self.condition_sizing,
            prompt_sees_controls=True,  # Qwen2.5-VL sees the controls: reference dropout encodes each subset
            # measured: benchmarks/calibrate_activations.py; the prompt: the user text + ~190 VL tokens per control
            memory=MemoryProfile(activations=(("QwenImageTransformerBlock", 12.6),),
                                 half=(("QwenImageTransformerBlock", 22.1),), text_tokens=300),
        )


VARIANTS: dict[str, QwenVariant] = {
    v.name: v
    for v in (
        QwenVariant(
            name="qwen-edit",
            description="Qwen-Image-Edit (QwenImageTransformer2DModel; Qwen2.5-VL prompt that sees the control; 1 control)",
            pipeline="diffusers.QwenImageEditPipeline",
            default_model="Qwen/Qwen-Image-Edit",
            max_controls=1,
            multi_image=False,
            vl_area=None,
            zero_cond_t=False,
        ),
        QwenVariant(
            name="qwen-edit-plus",
            description="Qwen-Image-Edit-2509 (1-3 controls, 'Picture i:' prompt template, VL images at ~384x384)",
            pipeline="diffusers.QwenImageEditPlusPipeline",
            default_model="Qwen/Qwen-Image-Edit-2509",
            max_controls=3,
            multi_image=True,
            vl_area=VL_AREA_PLUS,
            zero_cond_t=False,
        ),
        QwenVariant(
            name="qwen-edit-2511",
            description="Qwen-Image-Edit-2511 (as 2509; the transformer's zero_cond_t runs control tokens at t=0)",
            pipeline="diffusers.QwenImageEditPlusPipeline",
            default_model="Qwen/Qwen-Image-Edit-2511",
            max_controls=3,
            multi_image=True,
            vl_area=VL_AREA_PLUS,
            zero_cond_t=True,
        ),
    )
}


def variant_named(name: str) -> QwenVariant:
    """The variant called ``name``; ``ValueError`` listing the known names otherwise."""
    variant = VARIANTS.get(name)
    if variant is None:
        raise ValueError(f"unknown Qwen trainer '{name}' (known: {', '.join(VARIANTS)})")
    return variant
