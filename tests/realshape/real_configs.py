"""The real models' configs, and diffusers folders built from them at reduced depth (tests/realshape).

The hub is not reachable from the tests, so every value below is copied from the public config files of the
models qflux trains, as literal dicts. ``SOURCES`` names the file each dict comes from. Where a value was
read off a copy of the file embedded in another project's source (the hub itself was not read), the comment
says which; ``UNVERIFIED`` lists the values taken from memory of the file that no such copy confirmed.

What is changed from the real models, and why (``REDUCED``): depth only (the number of blocks / layers), so
that a step runs on a CPU in seconds; and the Qwen2.5-VL vocabulary, whose 152064 x 3584 embedding and
unshared LM head are 4.4 GB in float32. No logic of the models, the pipelines or qflux depends on that
vocabulary's size (the LM head is never used; the model finds image tokens by the ids in its config, which
the reduced tokenizer's ids fill in), so the tests use the tiny Qwen2 tokenizer with the real special tokens.
The T5 (32128) and CLIP (49408) vocabularies keep their real sizes: CLIP-L's config has ``eos_token_id: 2``,
for which transformers pools at ``argmax(input_ids)``, which is the end-of-text token only when that token
has the highest id of the vocabulary (49407), so that size is part of what the model's logic depends on.

Everything is float32: on a CPU without bfloat16 units a bfloat16 matmul is several times slower, and the
dtype is not what these tests are about.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------- FLUX.1 Kontext [dev]

# black-forest-labs/FLUX.1-Kontext-dev transformer/config.json
KONTEXT_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": None,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# black-forest-labs/FLUX.1-Kontext-dev vae/config.json (FLUX.1's autoencoder; the same values are embedded in
# several projects' copies of FLUX.1-dev / -schnell vae/config.json)
KONTEXT_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# black-forest-labs/FLUX.1-Kontext-dev text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
CLIP_L: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,  # legacy value: transformers then pools at argmax(input_ids) (see the module docstring)
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# black-forest-labs/FLUX.1-Kontext-dev text_encoder_2/config.json (google/t5-v1_1-xxl; d_ff / d_model / heads /
# layers / vocab also in the T5-XXL configs embedded in several projects' SD3 / FLUX loaders)
T5_XXL: dict[str, Any] = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# tokenizer/ (CLIPTokenizer) and tokenizer_2/ (T5TokenizerFast) of the same repo
CLIP_TOKENIZER = {"vocab_size": 49408, "model_max_length": 77, "bos": "<|startoftext|>", "eos": "<|endoftext|>"}
T5_TOKENIZER = {"pieces": 32000, "extra_ids": 100, "model_max_length": 512}

# model_index.json of the same repo
KONTEXT_INDEX: dict[str, Any] = {
    "_class_name": "FluxKontextPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# --------------------------------------------------------------------------- Qwen-Image-Edit (-2509, -2511)

# Qwen/Qwen-Image-Edit transformer/config.json; Qwen/Qwen-Image-Edit-2509 has the same values (UNVERIFIED);
# Qwen/Qwen-Image-Edit-2511 adds "zero_cond_t": true. The widths, heads, RoPE axes and joint dim are also in
# copies embedded in several projects (e.g. loaders with "zero_cond_t": True for 2511).
QWEN_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 768,
}
QWEN_TRANSFORMER_2511: dict[str, Any] = {**QWEN_TRANSFORMER, "zero_cond_t": True}

# Qwen/Qwen-Image-Edit vae/config.json (Qwen-Image's VAE; latents_mean / latents_std equal
# AutoencoderKLQwenImage's defaults, which qflux_qwen.tiny copies)
QWEN_VAE: dict[str, Any] = {
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}

# Qwen/Qwen-Image-Edit text_encoder/config.json (Qwen2.5-VL-7B-Instruct; the whole file is embedded in
# kohya-ss/musubi-tuner's Qwen2.5-VL loader, QWEN2_5_VL_CONFIG_JSON)
QWEN25_VL_TEXT: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"mrope_section": [16, 24, 24], "rope_type": "default", "rope_theta": 1000000.0},
    "sliding_window": None,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN25_VL_VISION: dict[str, Any] = {
    "depth": 32,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "hidden_size": 1280,
    "in_channels": 3,
    "initializer_range": 0.02,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "window_size": 112,
}
QWEN25_VL_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                    "vision_end_token_id": 151653}

# Qwen/Qwen-Image-Edit processor/preprocessor_config.json (Qwen2.5-VL's; the pixel bounds, patch / merge /
# temporal sizes and CLIP mean / std are also in several projects' copies of Qwen2.5-VL's file). Written as is:
# transformers 5 must read min_pixels / max_pixels from it (its own default max is 1003520, not 12845056).
QWEN_PREPROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "patch_size": 14,
    "processor_class": "Qwen2VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "temporal_patch_size": 2,
}


def qwen_index(pipeline: str) -> dict[str, Any]:
    """model_index.json of Qwen/Qwen-Image-Edit (QwenImageEditPipeline) and -2509 / -2511 (...PlusPipeline)."""
    return {
        "_class_name": pipeline,
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }


SOURCES = {
    "KONTEXT_TRANSFORMER": "black-forest-labs/FLUX.1-Kontext-dev transformer/config.json",
    "KONTEXT_VAE": "black-forest-labs/FLUX.1-Kontext-dev vae/config.json",
    "CLIP_L": "black-forest-labs/FLUX.1-Kontext-dev text_encoder/config.json",
    "T5_XXL": "black-forest-labs/FLUX.1-Kontext-dev text_encoder_2/config.json",
    "QWEN_TRANSFORMER": "Qwen/Qwen-Image-Edit (and -2509) transformer/config.json",
    "QWEN_TRANSFORMER_2511": "Qwen/Qwen-Image-Edit-2511 transformer/config.json",
    "QWEN_VAE": "Qwen/Qwen-Image-Edit vae/config.json",
    "QWEN25_VL_*": "Qwen/Qwen-Image-Edit text_encoder/config.json",
    "QWEN_PREPROCESSOR": "Qwen/Qwen-Image-Edit processor/preprocessor_config.json",
    "schedulers": "qflux_kontext.tiny.SCHEDULER_CONFIG / qflux_qwen.tiny.SCHEDULER_CONFIG (the repos' "
                  "scheduler/scheduler_config.json)",
}
# Taken from memory of the files, not confirmed by an embedded copy read for this module.
UNVERIFIED = (
    "QWEN_TRANSFORMER for -2509 equal to Qwen-Image-Edit's",
    "QWEN_TRANSFORMER pooled_projection_dim 768 (an unused key of the real file)",
    "CLIP_L bos/eos/pad ids 0/2/1 and layer_norm_eps",
    "T5_XXL dropout_rate / initializer_factor (no effect in eval / on loaded weights)",
    "KONTEXT_INDEX feature_extractor / image_encoder entries",
)

# What the tests change (depth only, plus the Qwen vocabulary: see the module docstring).
REDUCED: dict[str, dict[str, Any]] = {
    "KONTEXT_TRANSFORMER": {"num_layers": 1, "num_single_layers": 1},
    "KONTEXT_VAE": {"layers_per_block": 1},
    "CLIP_L": {"num_hidden_layers": 1},
    "T5_XXL": {"num_layers": 1, "num_decoder_layers": 0},
    "QWEN_TRANSFORMER": {"num_layers": 1},
    "QWEN_VAE": {"num_res_blocks": 1},
    "QWEN25_VL_TEXT": {"num_hidden_layers": 1, "max_window_layers": 1},
    # one windowed-attention block and one full-attention block, like blocks 6 and 7 of the real tower
    "QWEN25_VL_VISION": {"depth": 2, "fullatt_block_indexes": [1]},
}


def reduced(name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {**config, **REDUCED.get(name, {})}


# --------------------------------------------------------------------------- building the folders


def _seeded(seed: int, build):
    """``build()`` under its own seed, its parameters made in bfloat16: the real checkpoints are stored in
    bfloat16 too (their configs say ``torch_dtype: bfloat16``), and it halves what is written and read (the
    loaders upcast to ``model.dtype``, float32 in the tests)."""
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            return build()
        finally:
            torch.set_default_dtype(default)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _save(module: torch.nn.Module, folder: Path) -> None:
    module.save_pretrained(folder)
    del module


def clip_tokenizer_real_size():
    """The tiny CLIP BPE (qflux_kontext.tiny_tokenizers) laid out like openai/clip-vit-large-patch14's vocab:
    its learnt tokens, then unreachable filler tokens up to 49406, then ``<|startoftext|>`` = 49406 and
    ``<|endoftext|>`` = 49407, the real ids."""
    from qflux_kontext.tiny_tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(vocab_size=CLIP_TOKENIZER["vocab_size"])
    tokenizer.model_max_length = CLIP_TOKENIZER["model_max_length"]
    return tokenizer


def t5_tokenizer_real_size():
    """A T5 Unigram tokenizer with the real layout: 32000 pieces (``<pad>``=0, ``</s>``=1, ``<unk>``=2, the
    tiny word pieces, then low-scored fillers) + 100 extra ids, ``model_max_length`` 512."""
    from transformers import T5TokenizerFast

    from qflux_kontext.tiny_tokenizers import build_t5_tokenizer

    pieces = json.loads(build_t5_tokenizer().backend_tokenizer.to_str())["model"]["vocab"]
    pieces = [tuple(p) for p in pieces]
    pieces += [(f"\u2581filler{i}", -30.0) for i in range(T5_TOKENIZER["pieces"] - len(pieces))]
    return T5TokenizerFast(vocab=pieces, extra_ids=T5_TOKENIZER["extra_ids"],
                           model_max_length=T5_TOKENIZER["model_max_length"])


def build_kontext_folder(path: Path) -> Path:
    """A FLUX.1 Kontext diffusers folder: real configs at reduced depth, one component at a time (the peak
    memory is the largest component, not the sum)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from qflux_kontext.tiny import tiny_scheduler

    path = Path(path)
    _write_json(path / "model_index.json", KONTEXT_INDEX)
    tiny_scheduler().save_pretrained(path / "scheduler")
    # from_config, as from_pretrained does: it ignores the keys of a real config.json that __init__ lacks
    _save(_seeded(1, lambda: FluxTransformer2DModel.from_config(reduced("KONTEXT_TRANSFORMER", KONTEXT_TRANSFORMER))),
          path / "transformer")
    _save(_seeded(2, lambda: AutoencoderKL.from_config(reduced("KONTEXT_VAE", KONTEXT_VAE))), path / "vae")
    _save(_seeded(3, lambda: CLIPTextModel(CLIPTextConfig(**reduced("CLIP_L", CLIP_L)))), path / "text_encoder")
    _save(_seeded(4, lambda: T5EncoderModel(T5Config(**reduced("T5_XXL", T5_XXL)))), path / "text_encoder_2")
    clip_tokenizer_real_size().save_pretrained(path / "tokenizer")
    t5_tokenizer_real_size().save_pretrained(path / "tokenizer_2")
    return path


def build_qwen_shared(path: Path) -> Path:
    """The components the three Qwen trainers' models share (vae, text_encoder, tokenizer, processor,
    scheduler) and the two transformers (``transformer``: Edit / 2509, ``transformer-2511``)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from qflux_qwen.tiny import tiny_scheduler
    from qflux_qwen.tiny_tokenizer import build_tiny_tokenizer, special_token_ids

    path = Path(path)
    tiny_scheduler().save_pretrained(path / "scheduler")
    # from_config, as from_pretrained does: it ignores the keys of a real config.json that __init__ lacks
    # (Qwen-Image's pooled_projection_dim)
    _save(_seeded(1, lambda: AutoencoderKLQwenImage.from_config(reduced("QWEN_VAE", QWEN_VAE))), path / "vae")
    _save(_seeded(0, lambda: QwenImageTransformer2DModel.from_config(reduced("QWEN_TRANSFORMER", QWEN_TRANSFORMER))),
          path / "transformer")
    # 2511's transformer differs by its config alone (zero_cond_t adds no weights): its own config.json, the
    # same weights file
    (path / "transformer-2511").mkdir()
    for file in (path / "transformer").iterdir():
        if file.name != "config.json":
            os.symlink(file, path / "transformer-2511" / file.name)
    config = json.loads((path / "transformer" / "config.json").read_text())
    _write_json(path / "transformer-2511" / "config.json", {**config, "zero_cond_t": QWEN_TRANSFORMER_2511["zero_cond_t"]})

    tokenizer = build_tiny_tokenizer()
    ids = special_token_ids(tokenizer)
    # the reduced vocabulary (module docstring): the special-token ids are the tokenizer's, as in the real pair
    text = reduced("QWEN25_VL_TEXT", QWEN25_VL_TEXT)
    text.update(vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=reduced("QWEN25_VL_VISION", QWEN25_VL_VISION),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    _save(_seeded(2, lambda: Qwen2_5_VLForConditionalGeneration(config)), path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    video_processor = Qwen2VLVideoProcessor()
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=video_processor).save_pretrained(path / "processor")
    # The hub's layout: the real preprocessor_config.json (min_pixels / max_pixels keys) and a
    # video_preprocessor_config.json, no processor_config.json (transformers 5 writes one embedding its own
    # defaults, which from_pretrained would read instead)
    (path / "processor" / "processor_config.json").unlink(missing_ok=True)
    video_processor.save_pretrained(path / "processor")
    _write_json(path / "processor" / "preprocessor_config.json", QWEN_PREPROCESSOR)
    return path


def qwen_folder(shared: Path, path: Path, trainer: str) -> Path:
    """The diffusers folder of one Qwen trainer: links to the shared components and its own model_index.json."""
    from qflux_qwen.variants import VARIANTS

    variant = VARIANTS[trainer]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "model_index.json", qwen_index(variant.pipeline_class_name))
    for component in ("vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        os.symlink(shared / component, path / component)
    os.symlink(shared / ("transformer-2511" if variant.zero_cond_t else "transformer"), path / "transformer")
    return path
