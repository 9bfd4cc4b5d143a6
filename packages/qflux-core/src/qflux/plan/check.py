"""``qflux train``'s memory check, before anything is loaded: the plan of the run against what this machine has.

- with an accelerator: the plan's accelerator peak plus ``RUNTIME_RESERVE`` against the device's free memory
  (``torch.cuda.mem_get_info``); ``model.offload_blocks: auto`` becomes the smallest number of blocks that
  fits (written into the config: ``config.yaml`` of the run shows it);
- without one: the plan's host peak against the RAM this process has plus what the OS reports available.

A run that cannot fit stops with exit 2 and one line naming the settings that would (``qflux.plan.fit``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qflux.errors import UserError
from qflux.plan.estimate import RUNTIME_RESERVE, GiB, gather, plan, rss_bytes
from qflux.plan.fit import describe, fitting_settings, smallest_offload

if TYPE_CHECKING:  # pragma: no cover
    from qflux.config.schema import QfluxConfig
    from qflux.plugins import Registry


class DoesNotFit(UserError):
    """The run's planned peak exceeds this machine's memory (exit code 2)."""


def available_host_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo plus this process's own resident set (the plan counts it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + rss_bytes()
    except OSError:
        return None
    return None


def free_accelerator_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def local_processes() -> int:
    import os

    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def references_of(records: list[Any] | None) -> int:
    """The most control images a training record carries (1 when unknown)."""
    counts = [len(getattr(r, "controls", ()) or ()) for r in records or ()]
    return max(counts, default=1)


def check_memory(config: QfluxConfig, registry: Registry, records: list[Any] | None = None,
                 world_size: int = 1) -> None:
    """Refuse a run whose plan does not fit (see the module docstring); resolve ``offload_blocks: auto``."""
    import torch

    accelerator = torch.accelerator.is_available()
    budget = free_accelerator_bytes() if accelerator else available_host_bytes()
    if budget is None:
        return
    try:
        inputs = gather(config, registry, references=references_of(records))
    except UserError:
        return  # a model the planner cannot build offline: the loader reports it with context
    where = "accelerator" if accelerator else "host"
    # processes of one machine share its RAM (each has a device of its own)
    room = budget - RUNTIME_RESERVE if accelerator else budget // local_processes()
    if accelerator and config.model.offload_blocks == "auto":
        n = smallest_offload(config, inputs, room, accelerator)
        config.model.offload_blocks = n if n is not None else len(inputs.weights.blocks)
    result = plan(config, inputs, accelerator, world_size=world_size)
    phase, peak = result.peak(where)
    if peak <= room:
        return
    regather = lambda c: gather(c, registry, references=references_of(records), libraries=inputs.libraries)  # noqa: E731
    fits = fitting_settings(config, inputs, room, accelerator, where, regather)
    memory = f"{'the accelerator' if accelerator else 'host RAM'} ({room / GiB:.1f} GiB free)"
    raise DoesNotFit(f"this run needs ~{peak / GiB:.1f} GiB at its peak (phase {phase}; qflux plan shows the parts), "
                     f"more than {memory}; settings that fit: {describe(fits)}")
