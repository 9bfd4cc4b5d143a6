"""builtin:tiny: real classes at tiny sizes, deterministic, offline, saved as a loadable diffusers folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import torch


def test_tokenizer_template_prefix_and_special_tokens(encoders):
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    tok = encoders.tokenizer
    config = encoders.text_encoder.config
    for name in ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"):
        pipe = encoders.pipeline(name)
        template = pipe.prompt_template_encode
        prefix = template[: template.index("{}")]
        if isinstance(pipe, QwenImageEditPipeline):  # the edit template keeps the vision tokens after the prefix
            prefix = prefix.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
        assert isinstance(pipe, (QwenImageEditPipeline, QwenImageEditPlusPipeline))
        # the dropped prefix is exactly prompt_template_encode_start_idx tokens, as with the real tokenizer
        assert len(tok(prefix)["input_ids"]) == pipe.prompt_template_encode_start_idx == 64
    ids = tok.convert_tokens_to_ids
    assert config.image_token_id == ids("<|image_pad|>")
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert tok.tokenize("<|im_start|>user\nmake it red<|im_end|>")[0] == "<|im_start|>"
    assert config.text_config.vocab_size == len(tok)
    assert encoders.processor.image_token_id == config.image_token_id


def _vocab_digest_in_subprocess(seed: str) -> str:
    code = (
        "import hashlib, json\n"
        "from qflux_qwen.tiny_tokenizer import tiny_vocab_and_merges\n"
        "v, m = tiny_vocab_and_merges()\n"
        "print(hashlib.sha256(json.dumps([sorted(v.items()), m]).encode()).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED=seed)
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_tokenizer_deterministic_across_processes():
    from qflux_qwen.tiny_tokenizer import tiny_vocab_and_merges

    vocab, merges = tiny_vocab_and_merges()
    here = hashlib.sha256(json.dumps([sorted(vocab.items()), [list(m) for m in merges]]).encode()).hexdigest()
    assert _vocab_digest_in_subprocess("12345") == here  # another process, another str hash seed


def test_build_is_deterministic_without_global_rng_side_effects():
    from qflux_qwen.tiny import tiny_transformer, tiny_vae

    state = torch.random.get_rng_state()
    a, b = tiny_transformer("qwen-edit"), tiny_transformer("qwen-edit-2511")
    assert torch.equal(state, torch.random.get_rng_state())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)  # 2511 only flips zero_cond_t
    assert b.config.zero_cond_t and not a.config.zero_cond_t
    va, vb = tiny_vae().state_dict(), tiny_vae().state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_tiny_sizes(encoders, transformers_):
    transformer = transformers_["qwen-edit"]
    n = sum(p.numel() for p in transformer.parameters())
    assert 1_000_000 <= n <= 5_000_000
    vae = encoders.vae
    assert encoders.vae_factor == 8
    z = vae.config.z_dim
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == z == transformer.config.in_channels // 4
    assert transformer.config.joint_attention_dim == encoders.text_encoder.config.text_config.hidden_size
    assert encoders.scheduler_config["time_shift_type"] == "exponential"
    assert encoders.scheduler_config["use_dynamic_shifting"]


def test_save_tiny_folder_layout(plus_folder):
    index = json.loads((plus_folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert (plus_folder / component).is_dir()
