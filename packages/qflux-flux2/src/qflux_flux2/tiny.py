"""``builtin:tiny``: FLUX.2 [dev] and [klein] built from their real classes at tiny sizes, deterministic and
offline.

Every module is built under its own fixed seed inside ``torch.random.fork_rng`` (the global RNG state is left
as it was), so building one component alone gives the same weights as in ``build_tiny_pipeline()``.

- ``Flux2Transformer2DModel``: the real ``in_channels=128`` (32 latent channels x 2x2), 2 double-stream and 2
  single-stream blocks, 2 heads x 16 (RoPE axes 4+4+4+4 over ``(t, h, w, l)``), ``joint_attention_dim=48`` (3
  stacked hidden states of width 16); ``guidance_embeds`` for ``flux2-dev`` only.
- ``AutoencoderKLFlux2``: four blocks (VAE factor 8 like the real one), 32 latent channels, 2x2 patchify; its
  batch-norm statistics (which the pipelines normalise latents with) are set to fixed non-trivial values, so a
  test sees a missing or wrong normalisation.
- ``flux2-dev`` text encoder: ``Mistral3ForConditionalGeneration`` with a 31-layer, 16-wide Mistral text model
  (the pipeline stacks hidden states 10, 20 and 30) and a one-layer Pixtral vision tower; the tokenizer component
  is a ``PixtralProcessor`` (``qflux_flux2.tiny_tokenizers``).
- ``flux2-klein`` text encoder: ``Qwen3ForCausalLM``, 28 layers of width 16 (states 9, 18 and 27 are stacked;
  the real 4B has 36 layers); ``Qwen2TokenizerFast`` with Qwen3's chat template.
- ``FlowMatchEulerDiscreteScheduler`` with FLUX.2's scheduler config (dynamic shifting; the pipelines pass
  ``mu = compute_empirical_mu(...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qflux.plugin_api import TINY_ID  # noqa: F401  (re-exported: the id of these tiny models)
from qflux_flux2.variants import Flux2Variant, variant_named

TEXT_WIDTH = 16
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * TEXT_WIDTH,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
)

VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=4,
    mid_block_add_attention=False,
)

# black-forest-labs/FLUX.2-dev scheduler/scheduler_config.json
SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    shift_terminal=None,
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


def _variant(trainer: str | Flux2Variant) -> Flux2Variant:
    return trainer if isinstance(trainer, Flux2Variant) else variant_named(trainer)


def tiny_transformer(trainer: str | Flux2Variant = "flux2-klein") -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    config = dict(TRANSFORMER_CONFIG, guidance_embeds=_variant(trainer).guidance_embeds)
    return _seeded("transformer", lambda: Flux2Transformer2DModel(**config)).eval()


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLFlux2

    def build() -> torch.nn.Module:
        vae = AutoencoderKLFlux2(**VAE_CONFIG)
        channels = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(0.3 * torch.randn(channels))
        vae.bn.running_var.copy_(0.5 + torch.rand(channels))
        return vae

    return _seeded("vae", build).eval()


def tiny_text_encoder(trainer: str | Flux2Variant, tokenizer: Any) -> torch.nn.Module:
    """Mistral3 (``flux2-dev``, ``tokenizer`` = the Pixtral processor) or Qwen3 (``flux2-klein``)."""
    if _variant(trainer).name == "flux2-dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        from qflux_flux2.tiny_tokenizers import MISTRAL_SPECIALS, token_ids

        ids = token_ids(tokenizer.tokenizer, MISTRAL_SPECIALS)
        config = Mistral3Config(
            text_config=dict(
                model_type="mistral", vocab_size=len(tokenizer.tokenizer), hidden_size=TEXT_WIDTH,
                intermediate_size=32, num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, max_position_embeddings=4096, sliding_window=None,
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
            ),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=64, patch_size=8),
            image_token_index=ids["[IMG]"],
            spatial_merge_size=2,
            vision_feature_layer=-1,
        )
        return _seeded("text_encoder", lambda: Mistral3ForConditionalGeneration(config)).eval()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qflux_flux2.tiny_tokenizers import QWEN3_SPECIALS, token_ids

    ids = token_ids(tokenizer, QWEN3_SPECIALS)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    return _seeded("text_encoder", lambda: Qwen3ForCausalLM(config)).eval()


def tiny_tokenizer(trainer: str | Flux2Variant) -> Any:
    from qflux_flux2.tiny_tokenizers import pixtral_processor, qwen3_tokenizer

    return pixtral_processor() if _variant(trainer).name == "flux2-dev" else qwen3_tokenizer()


def tiny_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def tiny_encoder_parts(trainer: str | Flux2Variant = "flux2-klein") -> dict[str, Any]:
    """vae, text_encoder, tokenizer and scheduler (everything but the transformer)."""
    tokenizer = tiny_tokenizer(trainer)
    return {
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(trainer, tokenizer),
        "tokenizer": tokenizer,
        "scheduler": tiny_scheduler(),
    }


def build_tiny_pipeline(trainer_name: str = "flux2-klein") -> Any:
    """The trainer's diffusers pipeline (``Flux2Pipeline`` or ``Flux2KleinPipeline``, a base checkpoint:
    ``is_distilled=False``) with every component at its tiny size, float32, on CPU."""
    import diffusers

    variant = _variant(trainer_name)
    pipeline_class = getattr(diffusers, variant.pipeline_class_name)
    return pipeline_class(transformer=tiny_transformer(variant), **tiny_encoder_parts(variant))


def save_tiny(path: str | Path, trainer_name: str = "flux2-klein") -> Path:
    """Write the tiny pipeline as a diffusers folder (``model.pretrained: <path>`` loads it); returns the path."""
    path = Path(path)
    build_tiny_pipeline(trainer_name).save_pretrained(path)
    return path


def tiny_param_counts(trainer_name: str = "flux2-klein") -> dict[str, int]:
    pipe = build_tiny_pipeline(trainer_name)
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "vae", "text_encoder")
    }
