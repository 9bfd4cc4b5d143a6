"""Byte counts of a module's weights, quantized storage included."""

from __future__ import annotations

from typing import Any

import torch


def _tensors_of_quant_state(state: Any):
    """The tensors a bitsandbytes ``QuantState`` holds (absmax, code, offset, nested state2)."""
    if state is None:
        return
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            yield t
    yield from _tensors_of_quant_state(getattr(state, "state2", None))


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``, plus the bitsandbytes side storage that is neither
    (4-bit ``quant_state`` absmax / code / nested statistics, int8 row scales ``SCB``). Shared tensors count once.
    """
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.device.type == "meta" or t.numel() == 0:
            return
        key = (str(t.device), t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size())
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for t in module.parameters():
        add(t)
    for t in module.buffers():
        add(t)
    for m in module.modules():
        weight = getattr(m, "weight", None)
        for t in _tensors_of_quant_state(getattr(weight, "quant_state", None)):
            add(t)
        add(getattr(weight, "SCB", None))
        state = getattr(m, "state", None)  # Linear8bitLt keeps CB / SCB here after its first forward
        if state is not None and hasattr(state, "SCB"):
            add(state.SCB)
            add(getattr(state, "CB", None))
    return total
