"""Quantized bytes per layer, from shapes alone: what ``qflux plan`` counts for ``model.quantize``.

The same layers ``quantize_transformer`` replaces (``select_linears``: Linear layers inside the repeated blocks
and the input projections, minus ``model.quantize_skip``), and the storage each method gives a weight of
``out x in`` elements (tests/plan/test_plan.py compares these with the bytes of a quantized model):

- fp8 (``Float8Linear``) and int8 (bitsandbytes ``Linear8bitLt``): 1 byte per weight + a float32 scale per
  output row;
- nf4 / fp4 (bitsandbytes ``Linear4bit``, blocksize 64, ``compress_statistics=True``): half a byte per weight,
  an 8-bit absmax per 64 weights, a float32 absmax per 256 of those, the 256-entry float32 code table of the
  nested statistics, the 16-entry float32 code of the 4-bit type and the float32 offset.
"""

from __future__ import annotations

import math

from torch import nn

BLOCK, NESTED_BLOCK = 64, 256


def weight_bytes(numel: int, out_features: int, method: str) -> int:
    if method in ("fp8", "int8"):
        return numel + 4 * out_features
    if method in ("nf4", "fp4"):
        blocks = math.ceil(numel / BLOCK)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4 * 16 + 4
    raise ValueError(f"unknown quantization method {method!r}")


def planned_bytes(transformer: nn.Module, method: str, skip: list[str]) -> dict[str, int]:
    """{qualified name of each Linear ``method`` would replace: its quantized weight's bytes}."""
    from qflux_quant.quantize import select_linears

    chosen, _report = select_linears(transformer, skip)
    return {name: weight_bytes(linear.weight.numel(), linear.out_features, method) for name, linear in chosen}
