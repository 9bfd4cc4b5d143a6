"""Measure what autograd keeps per transformer block: the calibration of the planner's activation model.

``SavedBytesProbe`` counts, during the forward passes it watches, the bytes of the tensors autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``), per repeated block, once per storage (a view saved
twice, or a weight saved by several ops, counts once; parameters and buffers are not activations and are not
counted). Divided by the block's tokens x width x element size, that is the block's activation coefficient
(``qflux.plan.activations``): a number that depends on the block's code, not on its size, so it is measured
on the tiny models and holds for the full-size ones (``benchmarks/calibrate_activations.py`` prints it;
tests/plan/test_activations.py checks every trainer's declared coefficients against a real step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BlockRecord:
    """What one block saved in one forward: bytes, and the tokens x width it ran on."""

    cls: str
    saved_bytes: int = 0
    tokens: int = 0  # image + text tokens of one sample (the block's sequence length summed over its streams)
    width: int = 0  # the block's hidden size
    batch: int = 1
    element_size: int = 4

    @property
    def coefficient(self) -> float:
        return self.saved_bytes / max(self.tokens * self.width * self.batch * self.element_size, 1)


@dataclass
class SavedBytesProbe:
    """Per-block saved-tensor bytes of the forwards run inside ``watch()``; ``records`` has one entry per block
    call, in call order."""

    blocks: list[nn.Module]
    records: list[BlockRecord] = field(default_factory=list)
    outside: int = 0  # bytes saved outside the blocks (embeddings, final layer, loss)

    def __post_init__(self) -> None:
        self._current: BlockRecord | None = None
        self._seen: set[int] = set()
        self._frozen: set[int] = set()

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[SavedBytesProbe]:
        self._frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
                        if t.device.type != "meta"}
        handles = []
        for block in self.blocks:
            handles.append(block.register_forward_pre_hook(self._enter, with_kwargs=True))
            handles.append(block.register_forward_hook(self._leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        streams = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.dim() == 3]
        width = max((t.shape[-1] for t in streams), default=0)
        tokens = sum(t.shape[1] for t in streams if t.shape[-1] == width)
        first = streams[0] if streams else None
        self._current = BlockRecord(type(module).__name__, tokens=tokens, width=width,
                                    batch=first.shape[0] if first is not None else 1,
                                    element_size=first.element_size() if first is not None else 4)
        self.records.append(self._current)

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self._current = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._frozen or ptr in self._seen:
            return t
        self._seen.add(ptr)
        if self._current is not None:
            self._current.saved_bytes += storage.nbytes()
        else:
            self.outside += storage.nbytes()
        return t

    def coefficients(self) -> dict[str, float]:
        """The median coefficient per block class over the recorded calls."""
        import statistics

        by_class: dict[str, list[float]] = {}
        for r in self.records:
            by_class.setdefault(r.cls, []).append(r.coefficient)
        return {cls: statistics.median(values) for cls, values in by_class.items()}
