"""Tiny transformers, their inputs and a LoRA training loop for the qflux-quant tests (CPU, a second each)."""

from __future__ import annotations

import pytest
import torch

from qflux.config.schema import ModelConfig

METHODS = ("fp8", "int8", "nf4", "fp4")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# Relative error ||y_q - y|| / ||y|| of each quantized linear against its full-precision original, x ~ N(0, 1).
# Measured on the tiny Flux below (max over its 16 quantized layers, float32 and bfloat16 alike):
#   fp8 0.027, int8 0.008, nf4 0.107, fp4 0.128. Asserted bounds leave headroom for other seeds / CPUs.
ERROR_BOUNDS = {"fp8": 0.04, "int8": 0.02, "nf4": 0.15, "fp4": 0.18}

FLUX_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True,
)
QWEN_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
)


@pytest.fixture(autouse=True)
def quantize_on_cpu(monkeypatch):
    """These tests feed CPU tensors: keep quantized layers on CPU even where CUDA is available."""
    monkeypatch.setenv("QFLUX_QUANTIZE_DEVICE", "cpu")


def model_config(method: str | None, dtype: str = "float32", **overrides) -> ModelConfig:
    return ModelConfig(dtype=dtype, quantize=method, **overrides)


def tiny_flux(dtype: torch.dtype = torch.float32, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)


def tiny_qwen(dtype: torch.dtype = torch.float32, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**QWEN_CONFIG)
    return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)


def flux_inputs(dtype: torch.dtype = torch.float32, seed: int = 0, h: int = 4, w: int = 4, txt: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        guidance=torch.tensor([1.0], dtype=dtype),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


def qwen_inputs(dtype: torch.dtype = torch.float32, seed: int = 0, h: int = 4, w: int = 4, txt: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=g).to(dtype),
        encoder_hidden_states_mask=torch.ones(1, txt, dtype=torch.long),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_shapes=[[(1, h, w)]],
        return_dict=False,
    )


def add_lora(transformer, rank: int = 4, targets=LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Attach a LoRA the way the core does (``add_adapter``) and return its float32 trainable parameters."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                       init_lora_weights="gaussian"))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def train_steps(transformer, inputs: dict, steps: int = 6, lr: float = 1e-2, seed: int = 0):
    """A few AdamW steps regressing the output on a fixed random target; returns (losses, first-step grads)."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    assert params, "no trainable parameters"
    opt = torch.optim.AdamW(params, lr=lr)
    transformer.train()
    with torch.no_grad():
        out = transformer(**inputs)[0]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    losses, first_grads = [], None
    for _ in range(steps):
        pred = transformer(**inputs)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    transformer.eval()
    return losses, first_grads
