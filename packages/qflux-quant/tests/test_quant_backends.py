"""Each backend on tiny FLUX.1 / Qwen-Image transformers: accuracy of every quantized layer, LoRA training on
top, weight bytes, and LoRA state dicts that fit the unquantized base."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_tiny import (
    ERROR_BOUNDS,
    METHODS,
    add_lora,
    flux_inputs,
    model_config,
    quantize_on_cpu,  # noqa: F401 - autouse fixture
    qwen_inputs,
    tiny_flux,
    tiny_qwen,
    train_steps,
)

from qflux_quant.fp8 import Float8Linear
from qflux_quant.memory import weight_bytes
from qflux_quant.quantize import quantize_transformer, quantized_methods

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_each_quantized_linear_is_close_to_its_original(method, dtype):
    base = tiny_flux(DTYPES[dtype])
    quantized, report = quantize_transformer(copy.deepcopy(base), method, model_config(method, dtype))
    assert len(report.quantized) == 22 and quantized_methods(quantized) == {method: 22}
    g = torch.Generator().manual_seed(1)
    errors = {}
    for name in report.quantized:
        full, q = base.get_submodule(name), quantized.get_submodule(name)
        x = torch.randn(8, full.in_features, generator=g).to(DTYPES[dtype])
        with torch.no_grad():
            y, yq = full(x), q(x)
        assert yq.dtype == x.dtype and yq.shape == y.shape
        errors[name] = _rel(yq, y)
    worst = max(errors, key=errors.get)
    assert errors[worst] < ERROR_BOUNDS[method], f"{worst}: {errors[worst]:.4f}"
    assert min(errors.values()) > 0  # it really is quantized
    # the layers kept in full precision are untouched
    for name in (*report.skipped, *report.always_kept):
        assert torch.equal(quantized.get_submodule(name).weight, base.get_submodule(name).weight)


@pytest.mark.parametrize("method", METHODS)
def test_lora_trains_on_the_quantized_flux_transformer(method):
    model, _ = quantize_transformer(tiny_flux(), method, model_config(method))
    params = add_lora(model)
    layer = model.transformer_blocks[0].attn.to_q
    assert type(layer).__module__.startswith("peft") and quantized_methods(layer.base_layer) == {method: 1}
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    init = {id(p): p.detach().clone() for p in params}

    losses, first_grads = train_steps(model, flux_inputs(), steps=6)

    assert losses[-1] < losses[0], losses
    # LoRA B starts at zero: its gradient flows on the first step, A's from the second; both moved
    assert all(g.abs().sum() > 0 for n, g in first_grads.items() if ".lora_B." in n)
    assert all(not torch.equal(p, init[id(p)]) for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_lora_trains_on_the_quantized_qwen_transformer(method):
    model, report = quantize_transformer(tiny_qwen(), method, model_config(method))
    assert "transformer_blocks.0.img_mod.1" in report.quantized  # the modulation is inside the block
    assert {"img_in", "txt_in"} <= set(report.quantized)  # the input projections of both streams
    assert {"proj_out", "norm_out.linear"} <= set(report.always_kept)
    assert not any(n.startswith("time_text_embed.") for n in report.quantized)
    add_lora(model)
    losses, _ = train_steps(model, qwen_inputs(), steps=6)
    assert losses[-1] < losses[0], losses


# weight bytes of one 1024 x 1024 bf16 layer (with bias) after quantization, relative to bf16: measured
# fp8 0.502, int8 0.502, nf4 0.259, fp4 0.259 (4 bits + double-quantized block scales)
LAYER_RATIO = {"fp8": 0.51, "int8": 0.51, "nf4": 0.27, "fp4": 0.27}


@pytest.mark.parametrize("method", METHODS)
def test_weight_bytes_shrink(method):
    from qflux_quant.quantize import quantize_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 1024).to(torch.bfloat16)
    ratio = weight_bytes(quantize_linear(layer, method, torch.bfloat16)) / weight_bytes(layer)
    assert ratio < LAYER_RATIO[method], ratio

    base = tiny_flux(torch.bfloat16)
    quantized, _ = quantize_transformer(copy.deepcopy(base), method, model_config(method, "bfloat16"))
    assert weight_bytes(quantized) < weight_bytes(base)


def test_weight_bytes_count_bitsandbytes_side_storage():
    model, _ = quantize_transformer(tiny_flux(), "nf4", model_config("nf4"))
    layer = model.transformer_blocks[0].attn.to_q
    packed = layer.weight.numel() * layer.weight.element_size() + layer.bias.numel() * 4
    assert weight_bytes(layer) > packed  # absmax (double-quantized) + codes are counted


@pytest.mark.parametrize("method", METHODS)
def test_lora_state_dict_fits_the_unquantized_base(method):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    quantized, _ = quantize_transformer(tiny_flux(), method, model_config(method))
    add_lora(quantized)
    train_steps(quantized, flux_inputs(), steps=2, lr=5e-2)
    state = get_peft_model_state_dict(quantized)

    plain = tiny_flux()
    add_lora(plain)
    assert sorted(state) == sorted(get_peft_model_state_dict(plain))
    result = set_peft_model_state_dict(plain, state)
    assert not getattr(result, "unexpected_keys", None)
    loaded = get_peft_model_state_dict(plain)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # the LoRA changes the unquantized model the way it changed the quantized one
    inputs = flux_inputs(seed=3)
    with torch.no_grad():
        with_lora_q, with_lora = quantized(**inputs)[0], plain(**inputs)[0]
        plain.disable_adapters()
        without = plain(**inputs)[0]
    assert _rel(with_lora, without) > 1e-3
    assert _rel(with_lora_q, with_lora) < ERROR_BOUNDS[method]


def test_fp8_layer_keeps_its_storage_through_dtype_casts_and_saves_only_fp8_for_backward():
    layer = torch.nn.Linear(32, 48)
    q = Float8Linear.from_linear(layer, compute_dtype=torch.float32)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    before = q.dequantized_weight()
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16 and isinstance(q.weight, torch.nn.Parameter)
    assert torch.equal(q.dequantized_weight(torch.float32), before)
    q.float()

    saved: list[torch.dtype] = []
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved == [torch.float8_e4m3fn, torch.float32]  # the float8 weight and its scales, no upcast copy
    expected = before.t().sum(1)  # d(sum(x W^T))/dx = row sums of W^T
    assert torch.allclose(x.grad, expected.expand_as(x.grad), atol=1e-5)


def test_fp8_lora_layer_gets_float_adapter_weights():
    model, _ = quantize_transformer(tiny_flux(torch.bfloat16), "fp8", model_config("fp8", "bfloat16"))
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer, Float8Linear)
    assert layer.lora_A["default"].weight.dtype in (torch.bfloat16, torch.float32)  # never float8
