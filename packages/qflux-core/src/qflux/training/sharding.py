"""``train.fsdp``: shard the frozen base across processes with torch's FSDP2, keep the LoRA replicated.

Why not accelerate's own FSDP: it shards every parameter, the LoRA included (the export would then need a
gathered state dict), and it refuses to run without a GPU, so no test could exercise it. qflux keeps
accelerate for everything else (launch, process group, mixed precision, gradient accumulation, the optimizer
wrapper) and calls ``torch.distributed.fsdp.fully_shard`` itself, on every transformer block and then on the
root, with the LoRA parameters as ``ignored_params``:

- each process holds 1/N of every frozen base weight (a ``DTensor`` sharded on dim 0); each forward
  all-gathers one block at a time and frees it after use, so the base costs ~1/N of its memory at rest;
- the LoRA parameters stay plain, identical tensors on every process; FSDP does not reduce the gradients of
  ignored parameters, so ``all_reduce_mean`` averages them once per optimizer step (the job DDP does);
- the exported LoRA and the checkpoints read plain tensors: no gather, no collective on the main process.

Every forward is a collective: all processes must run the same number of forwards (see ``loop.py``).
The same code runs on GPUs (NCCL) and on CPU (gloo), which is where the tests run it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qflux.config.schema import QfluxConfig
from qflux.errors import ConfigError, UserError


@dataclass(frozen=True)
class ShardReport:
    """What ``shard_frozen_base`` did on this process."""

    units: int  # modules sharded as one unit (the blocks, then the root for the rest)
    local_params: int  # frozen base parameters this process holds
    total_params: int  # frozen base parameters of the whole model

    @property
    def fraction(self) -> float:
        return self.local_params / max(self.total_params, 1)


def check_fsdp(config: QfluxConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse what cannot work, before anything is loaded or written.

    - accelerate's FSDP (``accelerate launch --use_fsdp`` / ``distributed_type: FSDP``, seen as
      ``ACCELERATE_USE_FSDP``): it would shard the LoRA as well, and it refuses to start without a GPU;
    - ``train.fsdp`` with ``model.quantize``: packed bitsandbytes storage and float8 weights with their scales
      cannot be sharded this way, and a quantized base is small enough to replicate.
    """
    if _flag(environ.get("ACCELERATE_USE_FSDP", "")):
        raise UserError("accelerate's FSDP mode is not how qflux shards (it would shard the LoRA too and needs "
                        "a GPU): launch with a multi-process config such as configs/accelerate/fsdp.yaml (or "
                        "--multi_gpu) and set train.fsdp: true; see docs/multi-gpu.md")
    if config.train.fsdp and config.model.quantize:
        raise ConfigError(f"train.fsdp cannot shard a quantized base (model.quantize: {config.model.quantize}); "
                          "a quantized base is small enough to replicate: set train.fsdp: false (DDP) or "
                          "model.quantize: null")


def _flag(value: str) -> bool:
    """An environment flag as accelerate reads it (``str_to_bool``: y/yes/t/true/on/1)."""
    from accelerate.utils import str_to_bool

    try:
        return bool(str_to_bool(value)) if value else False
    except ValueError:
        return False


def blocks_of(transformer: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the elements of the model's top-level ``nn.ModuleList`` children
    (FLUX ``transformer_blocks`` + ``single_transformer_blocks``, Qwen-Image ``transformer_blocks``)."""
    return [block for child in transformer.children() if isinstance(child, nn.ModuleList) for block in child]


def local_numel(param: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def shard_frozen_base(transformer: nn.Module, trainable: list[nn.Parameter], device: torch.device) -> ShardReport:
    """``fully_shard`` each block and then the root in place, over all processes on ``device``'s type;
    ``trainable`` (the LoRA) stays replicated.

    Call after the LoRA is attached (and loaded, on resume) and before the optimizer is prepared: the
    trainable Parameter objects are kept (only moved), so an optimizer built on them stays valid. FSDP moves
    the weights it manages to the device block by block as it shards them (a base loaded on CPU never sits
    whole on one GPU); the ignored LoRA parameters are moved here.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    keep = {id(p) for p in trainable}
    total = sum(p.numel() for p in transformer.parameters() if id(p) not in keep)
    blocks = blocks_of(transformer)
    if isinstance(transformer, FSDPModule):  # sharded as it was loaded (``sharded_load``): only the report
        local = sum(local_numel(p) for p in transformer.parameters() if id(p) not in keep)
        return ShardReport(units=len(blocks) + 1, local_params=local, total_params=total)

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for p in trainable:
        p.data = p.data.to(device)

    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no nn.ModuleList of blocks to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if id(p) in keep})
    fully_shard(transformer, mesh=mesh, ignored_params={p for p in transformer.parameters() if id(p) in keep})
    local = sum(local_numel(p) for p in transformer.parameters() if id(p) not in keep)
    return ShardReport(units=len(blocks) + 1, local_params=local, total_params=total)


def all_reduce_mean(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of replicated parameters across processes: one flat all-reduce per call."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
