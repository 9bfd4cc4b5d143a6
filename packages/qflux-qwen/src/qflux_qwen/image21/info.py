"""What qflux knows of the ``qwen-image-2.1`` trainer without loading anything (light: no torch import).

Facts of ``QwenImage21Pipeline`` (diffusers 0.42.1) the stages rely on:

- the VAE (``AutoencoderKLQwenImage21``) compresses 16x and reads RGBA (an opaque image: alpha 255); latents have 64
  channels and are consumed unpatched, so one token covers a 16 x 16 pixel tile;
- every condition image is resized once to ``calculate_dimensions(output_resolution ** 2, aspect)`` (sides
  multiples of 32, ``output_resolution`` 1024) and that one copy feeds both the VAE and the Qwen3-VL encoder (which
  sees it composited over white);
- each VL image slot stands for 2 x 2 latent tokens, so target and conditions need sides that are multiples of 32;
- the pipeline takes any number of condition images; ``MAX_CONDITIONS`` caps what a sample may carry (each 1 MP
  condition adds ~4096 tokens to every attention).
"""

from __future__ import annotations

from qflux.plugin_api import ConditionSizing, MemoryProfile, TrainerInfo

NAME = "qwen-image-2.1"
PIPELINE = "diffusers.QwenImage21Pipeline"
DEFAULT_MODEL = "Qwen/Qwen-Image-2.1"
MAX_CONDITIONS = 4
SIDE_MULTIPLE = 32  # one VL image slot = 2 x 2 tokens of 16 px
CONDITION_AREA = 1024 * 1024  # output_resolution ** 2

INFO = TrainerInfo(
    name=NAME,
    family="qwen-image-2.1",
    description="Qwen-Image 2.1 (QwenImage21Transformer2DModel, block-causal single stream, Qwen3-VL prompt that "
                "sees the condition images; 0-4 conditions)",
    pipeline=PIPELINE,
    default_model=DEFAULT_MODEL,
    max_controls=MAX_CONDITIONS,
    needs_controls=False,  # text-to-image and image-conditioned generation are one model
    condition_sizing=ConditionSizing(area=CONDITION_AREA, multiple=SIDE_MULTIPLE),
    prompt_sees_controls=True,
    memory=MemoryProfile(activations=(("QwenImage21TransformerBlock", 23.3),),
                         half=(("QwenImage21TransformerBlock", 34.3),), text_tokens=300),  # measured: benchmarks/calibrate_activations.py
)
