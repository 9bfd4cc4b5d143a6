"""``builtin:tiny``: Qwen-Image-Edit built from its real classes at tiny sizes, deterministic and offline.

Every module is built under its own fixed seed inside ``torch.random.fork_rng`` (the global RNG state is left
as it was), so building one component alone gives the same weights as in ``build_tiny_pipeline()``, and the
transformer of one trainer equals that of another (2511 only flips ``zero_cond_t``, which adds no weights).

- ``QwenImageTransformer2DModel``: 4 dual-stream blocks, 4 heads x 32 (inner 128), rope axes (8, 12, 12),
  ``in_channels=64`` (16 latent channels x 2x2 packing), ``out_channels=16``, ``joint_attention_dim=64``
  (= the text encoder's hidden size); ``zero_cond_t=True`` for ``qwen-edit-2511``. ~2.5 M parameters.
- ``AutoencoderKLQwenImage``: ``base_dim=8``, ``dim_mult=[1, 2, 4, 4]``, three spatial downsamplings
  (``temperal_downsample=[False, True, True]``: VAE factor 8 like the real one), ``z_dim=16`` with the real
  model's 16 ``latents_mean`` / ``latents_std``. ~0.67 M parameters.
- ``Qwen2_5_VLForConditionalGeneration``: text hidden 64, 2 layers, 4 heads (2 KV heads), mrope (2, 3, 3);
  vision tower depth 2, hidden 32, patch 14, spatial merge 2, ``out_hidden_size=64``. ~0.22 M parameters.
  Its config's token ids point at the tiny tokenizer's special tokens.
- ``Qwen2Tokenizer`` (``qflux_qwen.tiny_tokenizer``), ``Qwen2VLProcessor`` with ``Qwen2VLImageProcessor`` and
  ``Qwen2VLVideoProcessor`` (defaults of Qwen2.5-VL: patch 14, merge 2).
- ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's config (exponential dynamic shift, terminal 0.02).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.plugin_api import TINY_ID  # noqa: F401  (re-exported: the id of these tiny models)
from qflux_qwen.variants import QwenVariant, variant_named

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

# AutoencoderKLQwenImage's own defaults (Qwen-Image's VAE statistics), one value per latent channel.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

VAE_CONFIG: dict[str, Any] = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=LATENTS_MEAN,
    latents_std=LATENTS_STD,
)

TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
)

VISION_CONFIG: dict[str, Any] = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    out_hidden_size=64,
)

# Qwen/Qwen-Image(-Edit*) scheduler/scheduler_config.json
SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)

SEEDS = {"transformer": 0, "vae": 1, "text_encoder": 2}


def _seeded(name: str, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[name])
        return build()


def _variant(trainer: str | QwenVariant) -> QwenVariant:
    return trainer if isinstance(trainer, QwenVariant) else variant_named(trainer)


def tiny_transformer(trainer: str | QwenVariant = "qwen-edit") -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    variant = _variant(trainer)
    config = dict(TRANSFORMER_CONFIG, zero_cond_t=variant.zero_cond_t)
    return _seeded("transformer", lambda: QwenImageTransformer2DModel(**config)).eval()


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    return _seeded("vae", lambda: AutoencoderKLQwenImage(**VAE_CONFIG)).eval()


def tiny_tokenizer() -> Any:
    from qflux_qwen.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def tiny_processor(tokenizer: Any = None) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
    )


def tiny_text_encoder(tokenizer: Any = None) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from qflux_qwen.tiny_tokenizer import special_token_ids

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    ids = special_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            TEXT_CONFIG,
            vocab_size=len(tokenizer),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return _seeded("text_encoder", lambda: Qwen2_5_VLForConditionalGeneration(config)).eval()


def tiny_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def tiny_encoder_parts() -> dict[str, Any]:
    """vae, text_encoder, tokenizer, processor and scheduler (everything but the transformer)."""
    tokenizer = tiny_tokenizer()
    return {
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "processor": tiny_processor(tokenizer),
        "scheduler": tiny_scheduler(),
    }


def build_tiny_pipeline(trainer_name: str = "qwen-edit") -> Any:
    """The trainer's diffusers pipeline (``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``) with
    every component at its tiny size, float32, on CPU."""
    import diffusers

    variant = _variant(trainer_name)
    pipeline_class = getattr(diffusers, variant.pipeline_class_name)
    return pipeline_class(transformer=tiny_transformer(variant), **tiny_encoder_parts())


def save_tiny(path: str | Path, trainer_name: str = "qwen-edit") -> Path:
    """Write the tiny pipeline as a diffusers folder (``model.pretrained: <path>`` loads it); returns the path."""
    path = Path(path)
    build_tiny_pipeline(trainer_name).save_pretrained(path)
    return path


def tiny_param_counts(trainer_name: str = "qwen-edit") -> dict[str, int]:
    """Parameter count of each tiny module."""
    pipe = build_tiny_pipeline(trainer_name)
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "vae", "text_encoder")
    }
