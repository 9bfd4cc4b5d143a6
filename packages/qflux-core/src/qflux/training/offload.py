"""``model.offload_blocks``: keep the frozen base weights of N repeated transformer blocks in host memory and
copy each to the compute device one block ahead of its use, in the forward and in the backward pass.

Which blocks: the model class's ``_repeated_blocks`` (``FluxTransformerBlock``, ``FluxSingleTransformerBlock``,
``QwenImageTransformerBlock``, the FLUX.2 blocks), in module order (their execution order), the first N
offloaded. What moves: each offloaded block's frozen tensors: parameters that do not require grad, buffers,
and the side storage of quantized layers (bitsandbytes 4-bit ``quant_state`` absmax / code / offset, int8
``CB`` / ``SCB``; float8 weights and scales are plain tensors). Adapter parameters (``requires_grad``) stay
where they are: on the device. Tensors shared with anything outside one offloaded block stay resident.

How (the FSDP-1 storage trick, not ``param.data`` swapping): every moved tensor gets one device tensor for
the whole run, whose storage is resized to 0 bytes when the block is released and back to its size when it
is fetched, then filled from the host copy. Every view of a weight (``weight.t()`` saved by autograd for
the backward pass, bitsandbytes' ``ctx.tensors``, ``Linear8bitLt.state.CB``) shares that storage, so

- a release really frees the device memory even while the autograd graph holds views of the weights;
- the backward pass sees the weights again once the block is fetched (no saved-tensor hooks, which would
  fight gradient checkpointing's own);
- a layer whose weights are released raises (``setStorage: ... out of bounds for storage of size 0`` from
  ``F.linear``, "data is not allocated yet" from a matmul), on the CPU too: a wrong schedule cannot silently
  compute with stale or absent weights. (Not every kernel checks: a bare reduction over a released tensor
  can crash the process instead.)

Schedule. Forward: a block's forward pre-hook waits for its weights (fetching them if no prefetch did) and
starts the copy of the next offloaded block on a side stream (CUDA) while this one computes; its forward
post-hook releases it, and when grad is on hangs a hook on its outputs' gradients. Backward: that hook fires
before any node of the block runs (the gradient of a block's output is complete before its internals are
reached): it fetches the block, prefetches the previous offloaded one and releases offloaded blocks two or
more positions later (done). The end of the backward pass releases the rest (``queue_callback``). With
gradient checkpointing the recomputation runs the block's forward inside the backward pass: its pre-hook
fetches (normally a no-op) and its post-hook keeps the block, which the backward is about to need.

Streams (CUDA): storage is (re)allocated on the compute stream, the side stream waits for the compute stream
before copying into it (so memory is never handed out under a copy) and the compute stream waits for the
copy's event before the block runs. Host copies are pinned. Without an accelerator "host" and "device" are
both the CPU: the host copy and the device copy are separate allocations and the same hooks run, which is
what the tests use to prove that offloading changes nothing numerically.

``auto``: without an accelerator, every repeated block; with one, the smallest N for which the transformer's
weights minus the N offloaded blocks, plus two blocks in flight, fit in three quarters of the free device
memory (``torch.cuda.mem_get_info``, plus what the transformer already holds there): a quarter is left for
activations until the memory plan computes them.

Why not diffusers' ``apply_group_offloading(offload_type="block_level", use_stream=True)``: it is built for
inference. It snapshots every parameter of a group into pinned memory once (the LoRA's trainable ones too) and
onloads from that snapshot, so each forward would put the LoRA back to its initial values (without a stream
it moves the LoRA to the CPU, away from its optimizer state); it swaps ``param.data``, so the views autograd
saves for the backward pass keep every block's device copy alive until the backward (nothing saved) and
bitsandbytes' int8 ``state.CB`` keeps its own reference; and it does nothing in the backward pass.

DDP: the offloaded parameters and buffers are listed in ``_ddp_params_and_buffers_to_ignore`` (DDP would
broadcast them at wrap time); they are equal on every process, which loads the same files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qflux.config.schema import ModelConfig, QfluxConfig
from qflux.errors import ConfigError, UserError

log = logging.getLogger(__name__)

AUTO_FREE_FRACTION = 0.75  # ``auto``: the share of free device memory weights may take (the rest: activations)
# the quantizers qflux knows to work with offloading (qflux-quant); a plugin's quantizer declares
# ``offloadable = True`` on its Quantizer object to be accepted
OFFLOADABLE_QUANTIZERS = frozenset({"nf4", "fp4", "int8", "fp8"})


# --------------------------------------------------------------------------- discovery


def repeated_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of each instance of the model's ``_repeated_blocks``, in module order."""
    types = set(getattr(transformer, "_repeated_blocks", None) or ())
    return [(n, m) for n, m in transformer.named_modules() if n and type(m).__name__ in types]


def _quant_state_tensors(state: Any) -> Iterator[torch.Tensor]:
    if state is None:
        return
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            yield t
    yield from _quant_state_tensors(getattr(state, "state2", None))


def _own_frozen_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The frozen tensors ``module`` itself holds (not its children's): parameters without grad, buffers, and
    bitsandbytes' side storage (4-bit ``quant_state``, int8 ``CB`` / ``SCB`` on the weight or the layer's state)."""
    for p in module._parameters.values():
        if p is not None and not p.requires_grad:
            yield p
    for b in module._buffers.values():
        if b is not None:
            yield b
    weight = module._parameters.get("weight")
    if weight is not None and not weight.requires_grad:
        yield from _quant_state_tensors(getattr(weight, "quant_state", None))
        for attr in ("CB", "SCB"):
            t = getattr(weight, attr, None)
            if isinstance(t, torch.Tensor):
                yield t
    state = getattr(module, "state", None)
    for attr in ("CB", "SCB"):
        t = getattr(state, attr, None) if state is not None else None
        if isinstance(t, torch.Tensor):
            yield t


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return str(t.device), t.untyped_storage().data_ptr()


def resident_bytes(module: nn.Module, trainable: bool = True) -> dict[str, int]:
    """The probe: bytes of the storages ``module``'s frozen tensors (bitsandbytes side storage included) and,
    with ``trainable``, its trainable parameters hold now, per device, each storage once. A released block's
    tensors hold 0 bytes."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for m in module.modules():
        tensors = list(_own_frozen_tensors(m))
        if trainable:
            tensors += [p for p in m._parameters.values() if p is not None and p.requires_grad]
        for t in tensors:
            key = _storage_key(t)
            if key is None or key in seen:
                continue
            seen.add(key)
            out[key[0]] = out.get(key[0], 0) + t.untyped_storage().nbytes()
    return out


def resident_bytes_frozen(module: nn.Module) -> dict[str, int]:
    return resident_bytes(module, trainable=False)


def compute_device() -> torch.device:
    """Where the run computes: the current CUDA device (accelerate sets it per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- checks (preflight)


def check_offload(config: QfluxConfig, quantizer: Any | None, block_count: Callable[[], int | None]) -> None:
    """``ConfigError`` (one line, exit 2) for an offload setting that cannot work; reads no weights.
    ``block_count``: the transformer's repeated blocks (from the meta-device model), None when unknown."""
    setting = config.model.offload_blocks
    if setting == 0:
        return
    if isinstance(setting, int) and setting < 0:
        raise ConfigError(f"model.offload_blocks: {setting} is negative; give a number of blocks (0 = off) or auto")
    if config.train.fsdp:
        raise ConfigError("model.offload_blocks cannot be combined with train.fsdp (the sharded base is not "
                          "offloaded block by block): set one of them off")
    if config.train.compile:
        raise ConfigError("model.offload_blocks cannot be combined with train.compile yet (the fetch and release "
                          "hooks run inside the compiled blocks): set one of them off")
    if quantizer is not None and not getattr(quantizer, "offloadable", quantizer.name in OFFLOADABLE_QUANTIZERS):
        raise ConfigError(f"model.offload_blocks: the quantizer '{quantizer.name}' does not support block "
                          f"offloading (qflux-quant's {', '.join(sorted(OFFLOADABLE_QUANTIZERS))} do): set "
                          "model.offload_blocks: 0 or choose one of those")
    if isinstance(setting, int):
        count = block_count()
        if count is not None and setting > count:
            raise ConfigError(f"model.offload_blocks: {setting} is more than the {count} repeated blocks of "
                              f"this transformer; use at most {count} (or auto)")


def meta_block_count(transformer: nn.Module | None) -> int | None:
    return None if transformer is None else len(repeated_blocks(transformer))


# --------------------------------------------------------------------------- the offloader


@dataclass
class _Slot:
    """One storage of a block: the tensor objects that view it, the host copy and the device tensor."""

    tensors: list[torch.Tensor]
    host: torch.Tensor
    dev: torch.Tensor
    nbytes: int


@dataclass
class _Block:
    name: str
    module: nn.Module
    position: int
    offloaded: bool
    slots: list[_Slot] = field(default_factory=list)
    nbytes: int = 0
    resident: bool = True
    event: Any = None  # the side stream's copy, until the compute stream waited for it


@dataclass(frozen=True)
class OffloadReport:
    offloaded: int  # blocks
    blocks: int  # repeated blocks of the model
    offloaded_bytes: int
    device: str
    pinned: bool
    names: tuple[str, ...]

    def describe(self) -> str:
        return (f"model.offload_blocks: {self.offloaded} of {self.blocks} transformer blocks "
                f"({self.offloaded_bytes / 2**30:.2f} GiB of frozen weights) kept in "
                f"{'pinned ' if self.pinned else ''}host memory, fetched to {self.device} one block ahead")


class BlockOffloader:
    """Offloads the first ``count`` repeated blocks of ``transformer`` (see the module docstring).
    ``counters``: fetches / releases done, for tests and benchmarks; ``close()`` removes the hooks and leaves
    every block resident."""

    # fill released storage with 0xFF bytes before freeing it (tests: a fetch that skipped its copy could
    # otherwise read the old bytes back from the allocator and pass)
    poison = False

    def __init__(self, transformer: nn.Module, count: int, device: torch.device | None = None) -> None:
        found = repeated_blocks(transformer)
        if count > len(found):
            raise ConfigError(f"model.offload_blocks: {count} is more than the {len(found)} repeated blocks of "
                              f"{type(transformer).__name__}; use at most {len(found)} (or auto)")
        self.transformer = transformer
        self.device = device or compute_device()
        self.blocks = [_Block(n, m, i, i < count) for i, (n, m) in enumerate(found)]
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pin = self.device.type == "cuda"
        self.counters = {"fetches": 0, "releases": 0}
        self._graph_task: int | None = None
        self._handles: list[Any] = []
        with torch.no_grad():
            self._build_slots()
        for block in self.blocks:
            if block.offloaded:
                self.release(block)
        self._install_hooks()
        self._ignore_in_ddp()
        self.report = OffloadReport(count, len(self.blocks), sum(b.nbytes for b in self.blocks if b.offloaded),
                                    str(self.device), self.pin, tuple(b.name for b in self.blocks if b.offloaded))

    # ---- setup

    def _build_slots(self) -> None:
        owner_of: dict[int, int] = {}
        for block in self.blocks:
            if block.offloaded:
                for m in block.module.modules():
                    owner_of[id(m)] = block.position
        owners: dict[tuple[str, int], set[int]] = {}
        groups: dict[int, dict[tuple[str, int], list[torch.Tensor]]] = {}
        for m in self.transformer.modules():
            owner = owner_of.get(id(m), -1)
            for t in _own_frozen_tensors(m):
                key = _storage_key(t)
                if key is None:
                    continue
                owners.setdefault(key, set()).add(owner)
                if owner >= 0:
                    bucket = groups.setdefault(owner, {}).setdefault(key, [])
                    if not any(t is u for u in bucket):
                        bucket.append(t)
        for block in self.blocks:
            for key, tensors in groups.get(block.position, {}).items():
                if owners[key] != {block.position}:
                    continue  # shared with another block or the rest of the model: stays resident
                views = {(tuple(t.shape), t.stride(), t.storage_offset(), t.dtype) for t in tensors}
                if len(views) > 1:
                    continue  # different views of one storage (not seen in diffusers models): left resident
                block.slots.append(self._slot(tensors))
            block.nbytes = sum(s.nbytes for s in block.slots)

    def _slot(self, tensors: list[torch.Tensor]) -> _Slot:
        first = tensors[0]
        if type(first.data) is not torch.Tensor:
            raise UserError(f"model.offload_blocks: a {type(first.data).__name__} tensor of the transformer cannot be "
                            "offloaded (only plain tensors can); set model.offload_blocks: 0")
        host = first.detach().to("cpu", copy=True).contiguous()
        if self.pin:
            host = host.pin_memory()
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        dev.copy_(host)
        for t in tensors:
            t.data = dev
        return _Slot(list(tensors), host, dev, dev.untyped_storage().nbytes())

    def _ignore_in_ddp(self) -> None:
        """DDP broadcasts every parameter and buffer at wrap time: not the offloaded ones (released, and equal on
        every process since each loads the same files)."""
        names = list(getattr(self.transformer, "_ddp_params_and_buffers_to_ignore", []))
        moved = {id(t) for b in self.blocks if b.offloaded for s in b.slots for t in s.tensors}
        for name, t in list(self.transformer.named_parameters()) + list(self.transformer.named_buffers()):
            if id(t) in moved:
                names.append(name)
        self.transformer._ddp_params_and_buffers_to_ignore = names

    def _install_hooks(self) -> None:
        if not any(b.offloaded for b in self.blocks):
            return
        self._handles.append(self.transformer.register_forward_pre_hook(self._model_pre))
        for block in self.blocks:
            self._handles.append(block.module.register_forward_pre_hook(self._pre(block)))
            self._handles.append(block.module.register_forward_hook(self._post(block)))

    def close(self) -> None:
        """Remove the hooks; every offloaded block is fetched and stays resident."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            self._ensure(block)

    # ---- fetch / release

    def fetch(self, block: _Block) -> None:
        if block.resident:
            return
        with torch.no_grad():
            for slot in block.slots:
                slot.dev.untyped_storage().resize_(slot.nbytes)
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    for slot in block.slots:
                        slot.dev.copy_(slot.host, non_blocking=True)
                    block.event = self.stream.record_event()
            else:
                for slot in block.slots:
                    slot.dev.copy_(slot.host)
        block.resident = True
        self.counters["fetches"] += 1

    def _wait(self, block: _Block) -> None:
        if block.event is not None:
            torch.cuda.current_stream(self.device).wait_event(block.event)
            block.event = None

    def _ensure(self, block: _Block) -> None:
        self.fetch(block)
        self._wait(block)

    def release(self, block: _Block) -> None:
        if not block.resident:
            return
        self._wait(block)  # never free memory a copy may still be writing
        for slot in block.slots:
            ptr = slot.dev.untyped_storage().data_ptr()
            for t in slot.tensors:  # a layer that re-pointed a tensor (a cast bias) gets ours back
                if t.untyped_storage().data_ptr() != ptr:
                    t.data = slot.dev
            if self.poison:
                slot.dev.untyped_storage().fill_(255)
            slot.dev.untyped_storage().resize_(0)
        block.resident = False
        self.counters["releases"] += 1

    def _next_offloaded(self, position: int, step: int) -> _Block | None:
        i = position + step
        while 0 <= i < len(self.blocks):
            if self.blocks[i].offloaded:
                return self.blocks[i]
            i += step
        return None

    # ---- hooks

    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    @torch.compiler.disable
    def _model_pre(self, module: nn.Module, args: Any) -> None:
        if not self._in_backward():
            first = self._next_offloaded(-1, 1)
            if first is not None:
                self.fetch(first)

    def _pre(self, block: _Block) -> Callable[..., None]:
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any) -> None:
            if self._in_backward():  # recomputation (gradient checkpointing)
                self._backward_enter(block)
                return
            self._ensure(block)
            following = self._next_offloaded(block.position, 1)
            if following is not None:
                self.fetch(following)

        return hook

    def _post(self, block: _Block) -> Callable[..., None]:
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():
                for t in _tensors_of(output):
                    if t.requires_grad and t.grad_fn is not None:
                        t.register_hook(self._grad_hook(block))
            if block.offloaded and not self._in_backward():
                self.release(block)

        return hook

    def _grad_hook(self, block: _Block) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._backward_enter(block)

        return hook

    def _backward_enter(self, block: _Block) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._graph_task:
            self._graph_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self._ensure(block)
        for later in self.blocks[block.position + 2:]:
            if later.offloaded and later.resident:
                self.release(later)
        previous = self._next_offloaded(block.position, -1)
        if previous is not None:
            self.fetch(previous)

    def _backward_done(self) -> None:
        self._graph_task = None
        for block in self.blocks:
            if block.offloaded:
                self.release(block)

    # ---- probe

    def resident_offloaded_bytes(self) -> int:
        """Bytes the offloaded blocks hold on the compute device now (0 between steps)."""
        return sum(s.dev.untyped_storage().nbytes() for b in self.blocks if b.offloaded for s in b.slots)


def _tensors_of(output: Any) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors_of(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors_of(item)


# --------------------------------------------------------------------------- setting -> count


def _block_bytes(module: nn.Module) -> int:
    return sum(resident_bytes_frozen(module).values())


def resolve_count(model: ModelConfig, transformer: nn.Module, device: torch.device | None = None) -> int:
    """The number of blocks ``model.offload_blocks`` asks for on this machine (see the module docstring)."""
    setting = model.offload_blocks
    blocks = repeated_blocks(transformer)
    if setting != "auto":
        return int(setting)
    device = device or compute_device()
    if device.type != "cuda":
        return len(blocks)
    sizes = [_block_bytes(m) for _, m in blocks]
    held = resident_bytes(transformer)
    total = sum(held.values())
    free, _ = torch.cuda.mem_get_info(device)
    budget = AUTO_FREE_FRACTION * (free + held.get(str(device), 0))
    in_flight = 2 * max(sizes, default=0)
    for n in range(len(blocks) + 1):
        if total - sum(sizes[:n]) + (in_flight if n else 0) <= budget:
            return n
    return len(blocks)


def apply_offload(transformer: nn.Module, model: ModelConfig, device: torch.device | None = None) -> BlockOffloader | None:
    """Set up ``model.offload_blocks`` on ``transformer`` (after the adapter is attached); None when off."""
    if model.offload_blocks == 0:
        return None
    count = resolve_count(model, transformer, device)
    if count == 0:
        log.info("model.offload_blocks: auto: the transformer fits on the device; nothing offloaded")
        return None
    offloader = BlockOffloader(transformer, count, device)
    transformer._qflux_offloader = offloader  # kept alive with the model; tests and benchmarks read it
    log.info(offloader.report.describe())
    return offloader
