"""Bytes of the weights a run holds, read from shapes: the transformer built on the meta device (as
quantized by the configured quantizer's ``planned_bytes``), per repeated block for offloading, the adapter's
trainable parameters with their gradients and optimizer state, and the encoders' files."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state per trainable parameter, in bytes (the parameters are float32): AdamW's two moments;
# bitsandbytes' 8-bit AdamW two uint8 moments (+ block statistics, negligible); Prodigy's exp_avg, exp_avg_sq,
# s and the initial copy p0; schedule-free AdamW's z and exp_avg_sq (its x is the parameter, y computed in
# place); torch's Adafactor: factored row/column second moments (~0) - counted as one float32 per parameter
# for the unfactored vectors and biases, an upper bound.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "prodigy": 16, "adamw_schedulefree": 8,
                         "adafactor": 4, "sgd": 0}
UNKNOWN_OPTIMIZER_BYTES = 16  # an import path: assume the largest of the known ones


@dataclass(frozen=True)
class TransformerWeights:
    """The frozen transformer's bytes on the compute device: ``total``, of which ``blocks`` (one entry per
    repeated block, in model order); ``quantized``: layers the quantizer replaces (0 without one or when
    the quantizer cannot say); ``width``: the blocks' hidden size."""

    total: int
    blocks: list[int]
    block_classes: list[str]
    width: int
    quantized: int
    quantizer_known: bool


def repeated_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{name}.{i}", block) for name, child in transformer.named_children()
            if isinstance(child, nn.ModuleList) for i, block in enumerate(child)]


def hidden_width(transformer: nn.Module) -> int:
    """The blocks' hidden size: heads x head dim of the diffusers config, else the first block's first Linear."""
    config = getattr(transformer, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    for _, block in repeated_blocks(transformer):
        for m in block.modules():
            if isinstance(m, nn.Linear):
                return m.in_features
    return 0


def transformer_weights(transformer: nn.Module, dtype: str, quantized: dict[str, int] | None) -> TransformerWeights:
    """Parameters and buffers at ``dtype``'s element size (float buffers; others at their own), with the
    Linear weights in ``quantized`` at their quantized bytes instead."""
    size = DTYPE_BYTES[dtype]
    quantized = quantized or {}
    replaced = {f"{name}.weight": n for name, n in quantized.items()}

    def tensor_bytes(name: str, t: torch.Tensor) -> int:
        if name in replaced:
            return replaced[name]
        return t.numel() * (size if t.is_floating_point() else t.element_size())

    def bytes_of(module: nn.Module, prefix: str) -> int:
        named = [*module.named_parameters(prefix=prefix), *module.named_buffers(prefix=prefix)]
        return sum(tensor_bytes(name, t) for name, t in named)

    blocks = repeated_blocks(transformer)
    return TransformerWeights(
        total=bytes_of(transformer, ""),
        blocks=[bytes_of(block, name) for name, block in blocks],
        block_classes=[type(block).__name__ for _, block in blocks],
        width=hidden_width(transformer),
        quantized=sum(quantized.values()),
        quantizer_known=True,
    )


def adapter_numel(transformer: nn.Module, adapter: Any, options: Any) -> int:
    """The trainable parameters ``adapter`` would attach to ``transformer`` (a meta-device model: attached to
    a deep copy, so the caller's model stays clean)."""
    import copy

    model = copy.deepcopy(transformer)
    params = adapter.attach(model, options)
    return sum(p.numel() for p in params)


def optimizer_state_bytes(optimizer: str) -> int:
    return OPTIMIZER_STATE_BYTES.get(optimizer.lower(), UNKNOWN_OPTIMIZER_BYTES)


# --------------------------------------------------------------------------- encoders (files)


def safetensors_numel(path: Path) -> tuple[int, int]:
    """(floating-point elements, bytes of the other tensors) of a safetensors file, from its header only."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    floats = other = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if entry["dtype"] in ("F32", "F16", "BF16", "F64"):
            floats += numel
        else:
            other += numel * {"I64": 8, "I32": 4, "I16": 2}.get(entry["dtype"], 1)
    return floats, other


def component_bytes(folder: Path, component: str, dtype: str) -> int | None:
    """The bytes a component of a diffusers folder takes once loaded in ``dtype`` (from its safetensors
    headers; None when it has none)."""
    files = sorted((folder / component).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        floats, other = safetensors_numel(f)
        total += floats * DTYPE_BYTES[dtype] + other
    return total
