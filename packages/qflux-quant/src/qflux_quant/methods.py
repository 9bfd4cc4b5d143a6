"""The quantization methods this package provides (no torch import: ``qflux plugins list`` reads this)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    backend: str  # "bitsandbytes" | "torch"
    description: str
    requires: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("nf4", "bitsandbytes", "bitsandbytes 4-bit NormalFloat (QLoRA), double-quantized block scales, "
               "compute in model.dtype", ("bitsandbytes",)),
        Method("fp4", "bitsandbytes", "bitsandbytes 4-bit float, double-quantized block scales, "
               "compute in model.dtype", ("bitsandbytes",)),
        Method("int8", "bitsandbytes", "bitsandbytes LLM.int8() (Linear8bitLt, int8 weights with row scales, "
               "outlier threshold 6.0)", ("bitsandbytes",)),
        Method("fp8", "torch", "weight-only float8 e4m3fn with per-output-channel scales, upcast to the input "
               "dtype in the forward (pure torch, CPU and GPU)"),
    )
}

MIN_BITSANDBYTES = "0.45"  # first release whose Linear4bit / Linear8bitLt run forward and backward on CPU
