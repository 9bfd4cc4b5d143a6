"""What fits: the smallest ``model.offload_blocks`` for a budget, and the settings to name when a plan does not
fit (``qflux train`` refuses such a run before loading anything, exit 2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qflux.plan.estimate import GiB, Inputs, MemoryPlan, plan

if TYPE_CHECKING:  # pragma: no cover
    from qflux.config.schema import QfluxConfig


@dataclass(frozen=True)
class Fit:
    """A change of settings and its plan's peak on the place that did not fit."""

    setting: str
    peak: int


def smallest_offload(config: QfluxConfig, inputs: Inputs, budget: int, accelerator: bool) -> int | None:
    """The fewest blocks to offload for the accelerator peak to fit ``budget`` (None: not even all)."""
    for n in range(len(inputs.weights.blocks) + 1):
        if (plan(config, inputs, accelerator, offload_blocks=n).accelerator_bytes or 0) <= budget:
            return n
    return None


def fitting_settings(config: QfluxConfig, inputs: Inputs, budget: int, accelerator: bool, where: str,
                     regather: Callable[[QfluxConfig], Inputs] | None = None) -> list[Fit]:
    """Single changes that bring the ``where`` peak ("accelerator" or "host") within ``budget``, cheapest in
    quality first: gradient checkpointing, offloading (accelerator only), a 4-bit base (when a quantizer is
    installed: ``regather`` re-counts the weights), a lower resolution, batch size 1."""
    def peak(p: MemoryPlan) -> int:
        return (p.accelerator_bytes or 0) if where == "accelerator" else p.host_bytes

    def with_(**sections: dict) -> QfluxConfig:
        data = config.model_dump()
        for section, values in sections.items():
            data[section].update(values)
        return type(config).model_validate(data)

    found: list[Fit] = []
    if not config.model.gradient_checkpointing:
        variant = with_(model={"gradient_checkpointing": True})
        value = peak(plan(variant, inputs, accelerator))
        if value <= budget:
            found.append(Fit("model.gradient_checkpointing: true", value))
    if accelerator and where == "accelerator" and not config.train.fsdp:
        for ckpt in (config.model.gradient_checkpointing, True):
            variant = with_(model={"gradient_checkpointing": ckpt})
            n = smallest_offload(variant, inputs, budget, accelerator)
            if n:
                extra = "" if ckpt == config.model.gradient_checkpointing else " with model.gradient_checkpointing: true"
                found.append(Fit(f"model.offload_blocks: {n}{extra} (or auto)",
                                 peak(plan(variant, inputs, accelerator, offload_blocks=n))))
                break
    if regather is not None and not config.model.quantize:
        try:
            variant = with_(model={"quantize": "nf4", "gradient_checkpointing": True})
            value = peak(plan(variant, regather(variant), accelerator))
            if value <= budget:
                found.append(Fit("model.quantize: nf4 with model.gradient_checkpointing: true", value))
        except Exception:  # noqa: BLE001 - nf4 not installed or not applicable: not a suggestion
            pass
    if config.train.batch_size > 1:
        variant = with_(train={"batch_size": 1}, model={"gradient_checkpointing": True})
        value = peak(plan(variant, inputs, accelerator))
        if value <= budget:
            found.append(Fit(f"train.batch_size: 1 with train.grad_accum: {config.train.batch_size * config.train.grad_accum} "
                             "and model.gradient_checkpointing: true", value))
    return found


def describe(fits: list[Fit]) -> str:
    if not fits:
        return "no single setting qflux knows brings it within: lower data.resolution, or a larger device"
    return "; ".join(f"{f.setting} ({f.peak / GiB:.1f} GiB)" for f in fits[:4])
