"""Weight-only float8 (e4m3fn) linear layer in pure torch: runs wherever torch has float8 (CPU and GPU).

Storage: ``weight`` is a frozen ``float8_e4m3fn`` parameter ``[out, in]`` holding ``W / scale`` and
``weight_scale`` a float32 buffer ``[out]`` with one scale per output channel (``amax / 448``), so every
row uses the whole e4m3 range. The forward upcasts to the input's dtype and runs an ordinary matmul.

Why a subclass of ``nn.Linear``: peft's LoRA dispatcher wraps any ``nn.Linear`` (``in_features`` /
``out_features`` / ``weight.device``), so ``transformer.add_adapter(LoraConfig(...))`` works unchanged;
``compute_dtype`` (the attribute bitsandbytes' ``Linear4bit`` also carries) tells peft which dtype to give
the adapter instead of float8.

Two details keep training memory honest:

- a custom autograd function saves only the float8 weight for the backward pass, never the upcast copy
  (plain ``F.linear`` would keep a full-precision weight alive per layer until backward);
- ``Module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` move the layer but never cast the float8 storage or the
  float32 scales (a cast would silently destroy the quantization); only device moves apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax quantization: ``(w_fp8 [out, in], scale float32 [out])``."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` in ``dtype`` (the product is formed in float32 only for float32 inputs)."""
    return weight.to(dtype) * scale.to(dtype)[:, None]


class _Float8Matmul(torch.autograd.Function):
    """``x @ dequant(W).T + b`` that saves the float8 weight (not the upcast one) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        w = dequantize_fp8(weight, scale, x.dtype)
        ctx.save_for_backward(weight, scale)
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_fp8(weight, scale, grad_out.dtype)
        grad_bias = None
        if ctx.bias_needs_grad:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Float8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in float8 e4m3fn with per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype or torch.float32
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> Float8Linear:
        """Quantize ``linear`` (on its own device); the bias is kept in ``compute_dtype``."""
        device = linear.weight.device
        compute_dtype = compute_dtype or linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    compute_dtype=compute_dtype)
        q, scale = quantize_fp8(linear.weight)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = scale.to(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Matmul.apply(x, self.weight, self.weight_scale, self.bias)

    def _apply(self, fn, recurse: bool = True):
        # Hide the float8 weight and float32 scales behind integer views while torch applies ``fn``: a dtype
        # cast skips integer tensors, a device move still applies.
        self.weight.data = self.weight.data.view(torch.uint8)
        self._buffers["weight_scale"] = self.weight_scale.view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.weight.data = self.weight.data.view(FP8_DTYPE)
            self._buffers["weight_scale"] = self._buffers["weight_scale"].view(torch.float32)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage=float8_e4m3fn, compute_dtype={self.compute_dtype}")
