"""``builtin:tiny`` for ``qwen-image-2.1``: the real classes at tiny sizes, deterministic and offline.

Every module is built under its own fixed seed inside ``torch.random.fork_rng`` (the global RNG state is left as it
was), so building one component alone gives the same weights as in ``build_tiny_pipeline()``.

- ``QwenImage21Transformer2DModel``: 2 blocks, 2 heads x 16, rope axes (4, 6, 6), ``in_channels=64`` (the real
  latent width), ``context_in_dim=32`` (= the text model's width), ``causal_condition`` on (the real default).
- ``AutoencoderKLQwenImage21``: ``base_dim=8``, five stages (``dim_mult=[1, 2, 2, 2, 2]``: VAE factor 16 like the
  real one), RGBA in and out, ``z_dim=64`` with the real model's 64 ``latents_mean`` / ``latents_std``.
- ``Qwen3VLForConditionalGeneration``: text width 32, 2 layers, mrope (2, 3, 3); vision tower depth 2, patch 16,
  spatial merge 2 (one image slot per 32 x 32 pixels, as the real one), ``out_hidden_size=32``.
- ``Qwen3VLProcessor``: the tiny Qwen2 tokenizer of ``qflux_qwen.tiny_tokenizer`` with a chat template that renders
  system and user turns as Qwen3-VL's does, ``Qwen2VLImageProcessor`` at patch 16 / merge 2 (pixels up to 2048^2
  kept as given, so the VL slots match the VAE's tokens), the Qwen3-VL video processor.
- ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (diffusers' defaults for the shift constants).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    num_layers=2, attention_head_dim=16, num_attention_heads=2, context_in_dim=32, axes_dims_rope=(4, 6, 6),
)
VAE_CONFIG: dict[str, Any] = dict(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 5000000.0,
                                  "mrope_interleaved": True},
)
VISION_CONFIG: dict[str, Any] = dict(
    depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[1],
)
SCHEDULER_CONFIG: dict[str, Any] = dict(use_dynamic_shifting=True, time_shift_type="exponential")
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for block in message['content'] -%}{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SEEDS = {"transformer": 10, "vae": 11, "text_encoder": 12}


def _seeded(name: str, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[name])
        return build()


def tiny_transformer() -> torch.nn.Module:
    from diffusers import QwenImage21Transformer2DModel

    return _seeded("transformer", lambda: QwenImage21Transformer2DModel(**TRANSFORMER_CONFIG)).eval()


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage21

    return _seeded("vae", lambda: AutoencoderKLQwenImage21(**VAE_CONFIG)).eval()


def tiny_processor() -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from qflux_qwen.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                   max_pixels=2048 * 2048, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
                            chat_template=CHAT_TEMPLATE)


def tiny_text_encoder(processor: Any) -> torch.nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qflux_qwen.tiny_tokenizer import special_token_ids

    tokenizer = processor.tokenizer
    ids = special_token_ids(tokenizer)
    config = Qwen3VLConfig(
        text_config=dict(TEXT_CONFIG, vocab_size=len(tokenizer)),
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return _seeded("text_encoder", lambda: Qwen3VLForConditionalGeneration(config)).eval()


def tiny_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def tiny_encoder_parts() -> dict[str, Any]:
    """vae, text_encoder, processor and scheduler (everything but the transformer)."""
    processor = tiny_processor()
    return {"vae": tiny_vae(), "text_encoder": tiny_text_encoder(processor), "processor": processor,
            "scheduler": tiny_scheduler()}


def build_tiny_pipeline() -> Any:
    """``QwenImage21Pipeline`` with every component at its tiny size, float32, on CPU."""
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline(transformer=tiny_transformer(), **tiny_encoder_parts())


def save_tiny(path: str | Path) -> Path:
    """Write the tiny pipeline as a diffusers folder (``model.pretrained: <path>`` loads it); returns the path."""
    path = Path(path)
    build_tiny_pipeline().save_pretrained(path)
    return path
