"""The ``Quantizer`` a plugin registers: a quantization backend as an object whose methods the core calls.

``check`` runs in preflight, before any data is encoded or weights are read (a missing bitsandbytes, an
unsupported GPU); ``quantize`` transforms the loaded, frozen transformer before the adapter is attached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig
    from qflux.types import QuantizerInfo


class Quantizer(ABC):
    """Base class of registered quantizers: set ``info`` (a ``QuantizerInfo``) and implement ``quantize``."""

    info: QuantizerInfo

    def __init__(self, info: QuantizerInfo | None = None) -> None:
        if info is not None:
            self.info = info
        if getattr(self, "info", None) is None:
            raise TypeError(f"{type(self).__name__}: a Quantizer needs info (a QuantizerInfo)")

    @property
    def name(self) -> str:
        return self.info.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.name!r}>"

    def check(self, model: ModelConfig) -> None:  # noqa: B027 - optional: nothing refused by default
        """Refuse (raise ``UserError``) what cannot run here: a missing library, an unsupported device or
        combination of ``model`` keys. Called by preflight, before anything is encoded or loaded."""

    @abstractmethod
    def quantize(self, transformer: torch.nn.Module, model: ModelConfig) -> torch.nn.Module:
        """Quantize the frozen ``transformer`` in place or return a replacement (``model.quantize_skip`` lists
        module name patterns to keep in full precision)."""
        raise NotImplementedError(f"{type(self).__name__}.quantize")

    def planned_bytes(self, transformer: torch.nn.Module, model: ModelConfig) -> dict[str, int] | None:
        """For ``qflux plan``: the layers ``quantize`` would replace in ``transformer`` (a meta-device model:
        read shapes only) and the bytes each one's weight takes once quantized, side storage included
        (scales, absmax statistics), by qualified module name. None (the default): not known; the planner
        then counts the weights unquantized and says so."""
        return None
