"""The real models' shapes (issue 13 section 7): each trainer loads a diffusers folder of its real model's
configs (every width, head count, RoPE axes, joint / pooled dims, VAE channels and statistics, T5-XXL and
CLIP-L, Qwen2.5-VL-7B's text and vision towers and its processor file) at reduced depth
(``real_configs.REDUCED``), through qflux's own loading code, encodes one 256 x 256 edit pair and trains one
step on the CPU (``qflux.run.train.train``: data, the plugin's encode / predict, core LoRA, loss, export).

What the run feeds the transformer is compared with what the diffusers pipelines compute with their own
helpers for a 256 x 256 image (``FluxKontextPipeline._prepare_latent_image_ids``, the edit pipelines'
``img_shapes``, transformers' ``smart_resize`` for the VL grid), and the RoPE axes with the attention head
dim, so a width or grid that only the tiny models get right fails here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import real_configs as real
import torch
from safetensors.torch import load_file

from qflux.config import load_config
from qflux.run.train import train
from qflux.testing import write_config

pytestmark = pytest.mark.slow

SIDE = 256
TOKENS = (SIDE // 16) ** 2  # VAE factor 8, then 2x2 packing: 16 x 16 tokens per 256 x 256 image


def run(tmp_path: Path, trainer: str, pretrained: Path, data: Path):
    config = {
        "trainer": trainer,
        "model": {"pretrained": str(pretrained), "dtype": "float32",
                  "lora": {"rank": 4, "alpha": 4, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}},
        # control_resolution target: the control keeps the sample's 256 x 256 (default: the pipeline's ~1 MP)
        "data": {"path": str(data), "resolution": SIDE, "control_resolution": "target", "holdout": 0},
        "cache": {"enabled": False},
        "train": {"max_steps": 1, "batch_size": 1, "lr": 1e-3, "save_every": 0, "seed": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = train(load_config(write_config(tmp_path / f"{trainer}.yaml", config)))
    assert result.steps == 1 and len(result.losses) == 1 and math.isfinite(result.losses[0])
    return result


def check_lora(result, inner: int, rank: int = 4) -> None:
    """The exported LoRA has the real widths: A is [rank, inner] and B [inner, rank] for each attention map."""
    lora = load_file(str(result.lora_path))
    q_a = [v for k, v in lora.items() if k.endswith("attn.to_q.lora_A.weight")]
    q_b = [v for k, v in lora.items() if k.endswith("attn.to_q.lora_B.weight")]
    assert q_a and q_b
    assert {tuple(t.shape) for t in q_a} == {(rank, inner)}
    assert {tuple(t.shape) for t in q_b} == {(inner, rank)}


def input_ids(call: dict) -> torch.Tensor:
    return call["input_ids"] if "input_ids" in call else call["args"][0]


# --------------------------------------------------------------------------- FLUX.1 Kontext


def test_kontext_real_shapes(tmp_path, kontext_folder, edit_pair, spy_on):
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    cfg = real.KONTEXT_TRANSFORMER
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]  # RoPE covers exactly one head
    assert cfg["in_channels"] == real.KONTEXT_VAE["latent_channels"] * 4  # 2x2 packing of the VAE latents
    assert cfg["joint_attention_dim"] == real.T5_XXL["d_model"]
    assert cfg["pooled_projection_dim"] == real.CLIP_L["hidden_size"]

    transformer_calls = spy_on(FluxTransformer2DModel)
    t5_calls, clip_calls = spy_on(T5EncoderModel), spy_on(CLIPTextModel)
    result = run(tmp_path, "kontext", kontext_folder, edit_pair)

    # the encoders: T5 at the real tokenizer's 512 tokens, CLIP at 77 with the end-of-text token (49407, the
    # vocabulary's highest id) where transformers pools for CLIP-L's eos_token_id 2 (argmax of the ids)
    t5_ids = input_ids(t5_calls.calls[0])
    assert t5_ids.shape[-1] == real.T5_TOKENIZER["model_max_length"] == 512
    clip_ids = input_ids(clip_calls.calls[0])
    assert clip_ids.shape[-1] == real.CLIP_TOKENIZER["model_max_length"]
    first_eot = (clip_ids[0] == real.CLIP_TOKENIZER["vocab_size"] - 1).nonzero()[0, 0]
    assert clip_ids[0].argmax() == first_eot > 0

    # the transformer as loaded from the folder, and the one training forward it ran
    (call,) = transformer_calls.calls
    model = call["module"]
    for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                "in_channels", "guidance_embeds"):
        assert model.config[key] == cfg[key], key
    assert tuple(model.config.axes_dims_rope) == tuple(cfg["axes_dims_rope"])
    assert call["hidden_states"].shape == (1, 2 * TOKENS, cfg["in_channels"])  # target + control tokens
    assert call["encoder_hidden_states"].shape == (1, 512, cfg["joint_attention_dim"])
    assert call["pooled_projections"].shape == (1, cfg["pooled_projection_dim"])
    assert call["guidance"] is not None and call["guidance"].shape == (1,)

    # position ids as the pipeline makes them: the target's (row, col) grid at index 0, the control's at 1
    grid = SIDE // 8 // 2
    expected = FluxKontextPipeline._prepare_latent_image_ids(1, grid, grid, torch.device("cpu"), torch.float32)
    control = expected.clone()
    control[:, 0] = 1
    img_ids = call["img_ids"].float()
    assert torch.equal(img_ids[:TOKENS], expected)
    assert torch.equal(img_ids[TOKENS:], control)
    assert torch.equal(call["txt_ids"].float(), torch.zeros(512, 3))
    with torch.no_grad():
        cos, sin = model.pos_embed(torch.cat([call["txt_ids"], call["img_ids"]]))
    assert cos.shape == sin.shape == (512 + 2 * TOKENS, cfg["attention_head_dim"])

    check_lora(result, inner)


# --------------------------------------------------------------------------- Qwen-Image-Edit, -2509, -2511


def vl_grid(width: int, height: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image in Qwen2.5-VL: transformers' own ``smart_resize`` with the real
    processor file's patch 14 x merge 2 and pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    p = real.QWEN_PREPROCESSOR
    factor = p["patch_size"] * p["merge_size"]
    h, w = smart_resize(height, width, factor=factor, min_pixels=p["min_pixels"], max_pixels=p["max_pixels"])
    return (1, h // p["patch_size"], w // p["patch_size"])


@pytest.mark.parametrize("trainer", ["qwen-edit", "qwen-edit-plus", "qwen-edit-2511"])
def test_qwen_real_shapes(trainer, tmp_path, qwen_shared, edit_pair, spy_on):
    from diffusers import QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    from qflux_qwen.variants import VARIANTS

    variant = VARIANTS[trainer]
    cfg = real.QWEN_TRANSFORMER_2511 if variant.zero_cond_t else real.QWEN_TRANSFORMER
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    assert cfg["in_channels"] == real.QWEN_VAE["z_dim"] * 4 and cfg["out_channels"] == real.QWEN_VAE["z_dim"]
    assert cfg["joint_attention_dim"] == real.QWEN25_VL_TEXT["hidden_size"] == real.QWEN25_VL_VISION["out_hidden_size"]

    folder = real.qwen_folder(qwen_shared, tmp_path / "model", trainer)
    # transformers 5 reads the real processor file's pixel bounds (its own default max is 1003520)
    processor = Qwen2VLProcessor.from_pretrained(folder, subfolder="processor")
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size,
            processor.image_processor.temporal_patch_size) == (14, 2, 2)

    transformer_calls = spy_on(QwenImageTransformer2DModel)
    vl_calls = spy_on(Qwen2_5_VLForConditionalGeneration)
    result = run(tmp_path, trainer, folder, edit_pair)

    # the VL encoder saw the control at the pipeline's size for this trainer, on Qwen2.5-VL's patch grid
    (vl,) = [c for c in vl_calls.calls if c.get("pixel_values") is not None][:1]
    size = (SIDE, SIDE) if variant.vl_area is None else calculate_dimensions(CONDITION_IMAGE_SIZE, 1.0)
    grid = vl_grid(*size)
    assert vl["image_grid_thw"].tolist() == [list(grid)]
    p = real.QWEN_PREPROCESSOR
    patch_dim = real.QWEN25_VL_VISION["in_channels"] * p["temporal_patch_size"] * p["patch_size"] ** 2
    assert vl["pixel_values"].shape == (math.prod(grid), patch_dim)
    # the reduced vocabulary keeps the real special tokens in the real order (ids relative to <|vision_start|>)
    te_config, real_ids = vl["module"].config, real.QWEN25_VL_TOKENS
    assert {k: getattr(te_config, k) - te_config.vision_start_token_id for k in real_ids} == {
        k: v - real_ids["vision_start_token_id"] for k, v in real_ids.items()}
    image_token = te_config.image_token_id
    assert int((vl["input_ids"] == image_token).sum()) == math.prod(grid) // p["merge_size"] ** 2

    (call,) = transformer_calls.calls
    model = call["module"]
    for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "in_channels", "out_channels",
                "patch_size"):
        assert model.config[key] == cfg[key], key
    assert bool(model.zero_cond_t) == variant.zero_cond_t == bool(cfg.get("zero_cond_t", False))
    assert call["hidden_states"].shape == (1, 2 * TOKENS, cfg["in_channels"])
    text = call["encoder_hidden_states"]
    assert text.shape[0] == 1 and text.shape[2] == cfg["joint_attention_dim"]
    # prompt tokens after the template prefix: the image tokens are among them
    assert text.shape[1] > math.prod(grid) // p["merge_size"] ** 2

    # img_shapes as the edit pipelines compute them: (1, H // vae_scale_factor // 2, W // ...) per image, with
    # vae_scale_factor = 2 ** len(vae.temperal_downsample)
    vae_scale = 2 ** len(real.QWEN_VAE["temperal_downsample"])
    shape = (1, SIDE // vae_scale // 2, SIDE // vae_scale // 2)
    assert [[tuple(s) for s in item] for item in call["img_shapes"]] == [[shape, shape]]
    with torch.no_grad():
        image_freqs, text_freqs = model.pos_embed(call["img_shapes"], device=torch.device("cpu"),
                                                  max_txt_seq_len=text.shape[1])
    assert image_freqs.shape == (2 * TOKENS, cfg["attention_head_dim"] // 2)  # complex: two dims each
    assert text_freqs.shape == (text.shape[1], cfg["attention_head_dim"] // 2)

    check_lora(result, inner)
