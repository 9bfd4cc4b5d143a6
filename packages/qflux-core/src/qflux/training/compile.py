"""``train.compile``: regional compilation of the transformer (diffusers' ``compile_repeated_blocks``).

Each repeated block (``FluxTransformerBlock``, ``QwenImageTransformerBlock``, ...: the model class's
``_repeated_blocks``) is compiled on its own. Blocks of one type share their code, and torch.compile treats
module parameters as graph inputs, so one type compiles once however many blocks the model has: a 57-block
FLUX transformer costs two compilations, not 57, and not one huge graph. The adapter is attached first (its
layers live inside the blocks and compile with them) and gradient checkpointing wraps compiled blocks.

Where compilation cannot work (no dynamo for this Python, no C++ compiler for the CPU backend, no Triton for
CUDA, a model class without repeated blocks) the run goes on eagerly and says why: a slower run, not a failed
one.
"""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qflux.config.schema import TrainConfig
from qflux.errors import ConfigError


@dataclass(frozen=True)
class CompileReport:
    compiled: bool
    blocks: int  # block instances compiled
    block_types: tuple[str, ...]  # their classes: one compilation each
    reason: str = ""  # why not, when not compiled


def check_compile(train: TrainConfig) -> None:
    """``ConfigError`` naming ``train.compile_backend`` when torch has no backend of that name (checked even with
    ``train.compile`` off, so turning it on later cannot fail on a typo)."""
    if train.compile_backend == "inductor":
        return
    import torch._dynamo

    names = torch._dynamo.list_backends(exclude_tags=())
    if train.compile_backend not in names:
        close = difflib.get_close_matches(train.compile_backend, names, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"train.compile_backend: torch.compile has no backend '{train.compile_backend}' (e.g. "
                          f"{', '.join(sorted(torch._dynamo.list_backends()))}){hint}")


def unavailable_reason(device: torch.device) -> str:
    """Why torch.compile cannot run on ``device`` here ("" when it can)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "the CUDA backend needs Triton (pip install triton)"
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        names = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, tuple) else (inductor_config.cpp.cxx,)
        names = tuple(n for n in names if n) or ("g++", "clang++")
        return "" if any(shutil.which(n) for n in names) else f"the CPU backend needs a C++ compiler ({names[0]})"
    return ""


def compile_blocks(transformer: torch.nn.Module, device: torch.device, say: Callable[[str], None],
                   backend: str | Callable = "inductor") -> CompileReport:
    """Compile each repeated block of ``transformer`` in place with ``backend`` (``train.compile_backend``);
    eager (with a message) where that cannot work."""
    types = tuple(getattr(transformer, "_repeated_blocks", None) or ())
    reason = unavailable_reason(device) if backend == "inductor" else ""
    if not reason and not types:
        reason = f"{type(transformer).__name__} names no repeated blocks (_repeated_blocks)"
    blocks = [m for m in transformer.modules() if type(m).__name__ in types] if not reason else []
    if not reason and not blocks:
        reason = f"none of {', '.join(types)} is in the model"
    if reason:
        say(f"train.compile: {reason}; training eagerly (uncompiled)")
        return CompileReport(False, 0, (), reason)
    for block in blocks:
        block.compile(backend=backend)
    found = tuple(t for t in types if any(type(b).__name__ == t for b in blocks))
    say(f"train.compile: {len(blocks)} blocks compiled regionally with {backend} ({', '.join(found)}: one compilation per type, "
        "on the first steps)")
    return CompileReport(True, len(blocks), found)
