"""Where a trainer's weights come from (``model.pretrained``): a diffusers folder, a hub id, ``builtin:tiny`` or a
built-in folder (``builtin:shapes-base``).

Shared by the trainer plugins so that every trainer reads ``model.pretrained`` and ``model.dtype`` the same way.
``ModelSource.of(model)`` reads ``model.pretrained`` once (kind, ``~``-expanded folder path, hub id and
revision); the loaders (``resolve_source``), the preflight and the cache key all take it from there.

A built-in folder (``BUILTIN_FOLDERS``) is a diffusers folder shipped inside a plugin package: ``ModelSource``
reads it as that folder (kind ``folder``), so loading, the preflight's checks and the cache key treat it like any
folder a user names. The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qflux.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig

TINY_ID = "builtin:tiny"
BUILTIN_PREFIX = "builtin:"
SourceKind = Literal["folder", "hub", "builtin"]
# builtin:<name> -> (package, folder inside it): diffusers folders that plugins ship
BUILTIN_FOLDERS: dict[str, tuple[str, str]] = {
    "builtin:shapes-base": ("qflux_kontext", "shapes_base"),  # FLUX.1 Kontext pretrained on builtin:shapes
}


def builtin_folder(pretrained: str) -> Path | None:
    """The folder of a ``BUILTIN_FOLDERS`` name, or None (not one, or its package is not installed)."""
    if pretrained not in BUILTIN_FOLDERS:
        return None
    package, folder = BUILTIN_FOLDERS[pretrained]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # pragma: no cover - a broken install
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) / folder if locations else None


def torch_dtype(model: ModelConfig) -> torch.dtype:
    """``model.dtype`` ("bfloat16") as the torch dtype."""
    import torch

    return getattr(torch, model.dtype)


def is_tiny(model: ModelConfig) -> bool:
    """``model.pretrained`` is ``builtin:tiny`` (the trainer's tiny builder loads it)."""
    return model.pretrained == TINY_ID


def written_like_path(source: str) -> bool:
    """True when ``source`` is spelled as a path (``.``, ``/``, ``~`` first, a backslash, or more than one
    ``/``), whether or not it exists."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def looks_like_path(source: str) -> bool:
    """Spelled as a path, or an existing one (``owner/name`` that is a folder here)."""
    return written_like_path(source) or os.path.exists(source)


@dataclass(frozen=True)
class ModelSource:
    """``model.pretrained`` read once.

    kind: ``builtin`` (``builtin:...``, known or not), ``folder`` (spelled as a path or existing here; it may
    be missing, which ``resolve`` / the preflight report) or ``hub`` (anything else: ``owner/name``, or a
    malformed id ``resolve`` reports). ``path``: the folder, ``~`` expanded (None unless ``folder``).
    """

    pretrained: str  # the value as given (messages and a hub/builtin cache key use it)
    kind: SourceKind
    path: Path | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, pretrained: str, revision: str | None = None) -> ModelSource:
        if pretrained.startswith(BUILTIN_PREFIX):
            folder = builtin_folder(pretrained)
            if folder is not None:
                return cls(pretrained, "folder", folder, revision)
            return cls(pretrained, "builtin", None, revision)
        if looks_like_path(pretrained):
            return cls(pretrained, "folder", Path(pretrained).expanduser(), revision)
        return cls(pretrained, "hub", None, revision)

    @classmethod
    def of(cls, model: ModelConfig) -> ModelSource:
        return cls.parse(model.pretrained, model.revision)

    @property
    def is_tiny(self) -> bool:
        return self.pretrained == TINY_ID

    @property
    def hub_id(self) -> str | None:
        """``owner/name`` of a well-formed hub id, else None."""
        return self.pretrained if self.kind == "hub" and self.pretrained.count("/") == 1 else None

    def resolve(self) -> str:
        """The folder (expanded) or the hub id; a missing folder, an unknown ``builtin:`` or a malformed id is a
        ``UserError`` (so is ``builtin:tiny``: the trainer's tiny builder loads it, not a folder or the hub)."""
        source = self.pretrained
        if self.kind == "builtin" and source in BUILTIN_FOLDERS:
            package = BUILTIN_FOLDERS[source][0].replace("_", "-")
            raise UserError(f"model.pretrained: {source} comes with the {package} package: pip install {package}")
        if self.kind == "builtin" and source != TINY_ID:
            raise UserError(f"model.pretrained: unknown built-in model '{source}' (use {TINY_ID})")
        if self.path is not None:
            if not self.path.is_dir():
                raise UserError(f"model.pretrained: folder '{source}' does not exist (expected a diffusers folder)")
            return str(self.path)
        if self.hub_id is None:
            raise UserError(f"model.pretrained '{source}' is neither a folder, a hub id (owner/name) nor {TINY_ID}")
        return self.hub_id


def resolve_source(model: ModelConfig) -> str:
    """The folder (expanded) or the hub id; a missing folder, an unknown ``builtin:`` or a malformed id is a
    ``UserError``."""
    return ModelSource.of(model).resolve()
