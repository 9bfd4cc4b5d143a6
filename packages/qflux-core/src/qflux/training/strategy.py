"""How the transformer is spread over processes: DDP (every process holds the whole base; accelerate wraps
it) or ``train.fsdp`` (the frozen base sharded, the adapter replicated; ``sharding``). One object answers
what differs between them for the rest of the run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qflux.training.sharding import all_reduce_mean, shard_frozen_base


@dataclass
class Strategy:
    transformer: torch.nn.Module  # what the step calls (DDP-wrapped or sharded)
    optimizer: Any  # accelerate's wrapper
    sharded: bool
    world: int
    # accelerate puts autocast into the forward of a model it prepares (kept by unwrap_model); a sharded model
    # is not prepared, so validation enters it explicitly (training does in micro_step)
    validation_autocast: Callable[[], Any]
    # averages the adapter's gradients across processes when no DDP wrapper does (train.fsdp)
    grad_sync: Callable[[list[torch.nn.Parameter]], None] | None

    def holdout_padding(self, holdout: list[Any], mine: int) -> int:
        """With a sharded base every forward is a collective: ranks with one held-out sample fewer run one
        batch more (the first sample again, not counted), so that all run the same number of forwards."""
        if not (self.sharded and holdout and len(holdout) % self.world):
            return 0
        return -(-len(holdout) // self.world) - mine


def prepare(accelerator: Any, transformer: torch.nn.Module, params: list[torch.nn.Parameter], optimizer: Any,
            fsdp: bool, say: Callable[[str], None]) -> Strategy:
    world = accelerator.num_processes
    sharded = fsdp and world > 1
    if sharded:
        report = shard_frozen_base(transformer, params, accelerator.device)
        say(f"train.fsdp: frozen base sharded over {world} processes in {report.units} units: "
            f"{report.local_params:,} of {report.total_params:,} base parameters on each "
            f"({report.fraction:.0%}); LoRA replicated")
        optimizer = accelerator.prepare(optimizer)  # not the model: accelerate would wrap it in DDP
        return Strategy(transformer, optimizer, True, world, accelerator.autocast,
                        lambda ps: all_reduce_mean(ps, world))
    if fsdp:
        say("train.fsdp: one process, nothing to shard")
    elif world > 1:
        say(f"DDP over {world} processes: each holds the whole base (train.fsdp: true shards it)")
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    return Strategy(transformer, optimizer, False, world, contextlib.nullcontext, None)
