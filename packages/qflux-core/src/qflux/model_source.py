"""Where a trainer's weights come from (``model.pretrained``): a diffusers folder, a hub id or ``builtin:tiny``.

Shared by the trainer plugins so that every trainer reads ``model.pretrained`` and ``model.dtype`` the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qflux.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig

TINY_ID = "builtin:tiny"


def torch_dtype(model: ModelConfig) -> torch.dtype:
    import torch

    return getattr(torch, model.dtype)


def is_tiny(model: ModelConfig) -> bool:
    return model.pretrained == TINY_ID


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or os.path.exists(source)


def resolve_source(model: ModelConfig) -> str:
    """The folder (expanded) or the hub id; a missing folder, an unknown ``builtin:`` or a malformed id is a
    ``UserError``."""
    source = model.pretrained
    if source.startswith("builtin:") and source != TINY_ID:
        raise UserError(f"model.pretrained: unknown built-in model '{source}' (use {TINY_ID})")
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(f"model.pretrained: folder '{source}' does not exist (expected a diffusers folder)")
        return str(path)
    if source.count("/") != 1:
        raise UserError(f"model.pretrained '{source}' is neither a folder, a hub id (owner/name) nor {TINY_ID}")
    return source
