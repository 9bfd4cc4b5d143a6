"""``builtin:tiny``: FLUX.1 Kontext built from its real classes at tiny sizes, deterministic and offline.

Every component is built under its own fixed seed inside ``torch.random.fork_rng`` (the global RNG state is
left as it was), so building only the transformer gives the same weights as the transformer of
``build_tiny_pipeline()``. Sizes (float32 parameter counts printed by ``tiny_param_counts()``):

- ``FluxTransformer2DModel``: 2 double + 2 single blocks, 4 heads x 32 (inner 128), rope axes (8, 12, 12),
  ``in_channels=64`` (16 latent channels x 2x2 packing), ``joint_attention_dim=64`` (= T5 d_model),
  ``pooled_projection_dim=32`` (= CLIP hidden), ``guidance_embeds=True`` like Kontext-dev. About 2.4 M params.
- ``AutoencoderKL``: 4 blocks (VAE factor 8), channels (16, 16, 32, 32), 16 latent channels, FLUX's
  ``shift_factor`` / ``scaling_factor``, no quant convs (like FLUX's VAE).
- ``CLIPTextModel`` (hidden 32, 2 layers) + byte-level BPE ``CLIPTokenizer``; ``T5EncoderModel`` (d_model 64,
  2 layers, gated-gelu like T5 v1.1) + Unigram ``T5TokenizerFast`` (``model_max_length=32``: the tiny default
  ``max_sequence_length``).
- ``FlowMatchEulerDiscreteScheduler`` with FLUX's config (dynamic shifting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.plugin_api import TINY_ID  # noqa: F401  (re-exported: the id of these tiny models)

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=256,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

CLIP_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
)

T5_CONFIG: dict[str, Any] = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=0,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# black-forest-labs/FLUX.1-Kontext-dev scheduler/scheduler_config.json
SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

SEEDS = {"transformer": 1, "vae": 2, "text_encoder": 3, "text_encoder_2": 4}


def _seeded(name: str, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[name])
        module = build()
    return module.eval().requires_grad_(False)


def tiny_transformer():
    from diffusers import FluxTransformer2DModel

    return _seeded("transformer", lambda: FluxTransformer2DModel(**TRANSFORMER_CONFIG))


def tiny_vae():
    from diffusers import AutoencoderKL

    return _seeded("vae", lambda: AutoencoderKL(**VAE_CONFIG))


def tiny_text_encoders() -> dict[str, Any]:
    """``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2`` (config vocab = tokenizer size)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from qflux_kontext.tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **CLIP_CONFIG,
    )
    t5_config = T5Config(vocab_size=len(tokenizer_2), **T5_CONFIG)
    return {
        "text_encoder": _seeded("text_encoder", lambda: CLIPTextModel(clip_config)),
        "tokenizer": tokenizer,
        "text_encoder_2": _seeded("text_encoder_2", lambda: T5EncoderModel(t5_config)),
        "tokenizer_2": tokenizer_2,
    }


def tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_tiny_components(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every component of the tiny ``FluxKontextPipeline``, by pipeline argument name, in ``dtype``."""
    parts = {"transformer": tiny_transformer(), "vae": tiny_vae(), **tiny_text_encoders()}
    if dtype != torch.float32:
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            # nn.Module.to: ModelMixin.to only adds a warning about modules kept in float32 (none here)
            torch.nn.Module.to(parts[name], dtype)
    parts["scheduler"] = tiny_scheduler()
    return parts


def build_tiny_pipeline(dtype: torch.dtype = torch.float32):
    """A ``FluxKontextPipeline`` of the tiny components (frozen, eval mode, on CPU)."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**build_tiny_components(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny model as a diffusers folder (``pipe.save_pretrained``), loadable by
    ``model.pretrained: <path>`` and by ``FluxKontextPipeline.from_pretrained(path)``."""
    path = Path(path)
    build_tiny_pipeline(dtype).save_pretrained(path)
    return path


def tiny_param_counts() -> dict[str, int]:
    parts = build_tiny_components()
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in parts.items()
        if isinstance(module, torch.nn.Module)
    }
