"""The qflux plugin (entry point ``quant``): registers the quantizers nf4, fp4, int8, fp8 and implements
``qflux_quantize``. Light on purpose: torch and bitsandbytes are imported inside the hook bodies only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qflux import hookimpl
from qflux.types import QuantizerInfo
from qflux_quant.methods import METHODS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.config.schema import ModelConfig
    from qflux.types import TrainerInfo


@hookimpl
def qflux_register_quantizers(register: Callable[[QuantizerInfo], None]) -> None:
    for method in METHODS.values():
        register(QuantizerInfo(name=method.name, description=method.description, requires=method.requires))


@hookimpl(tryfirst=True)
def qflux_load_transformer(trainer: TrainerInfo, model: ModelConfig) -> None:
    """Validation only, never loads anything (returns None, so the trainer's own loader runs next).

    Runs first so that a missing bitsandbytes or an unsupported combination is reported before minutes of
    weight loading, not after.
    """
    if model.quantize in METHODS:
        from qflux_quant.quantize import check_supported

        check_supported(model.quantize, model)
    return None


@hookimpl
def qflux_quantize(transformer: torch.nn.Module, method: str, model: ModelConfig) -> torch.nn.Module | None:
    if method not in METHODS:
        return None
    from qflux_quant.quantize import quantize_transformer

    quantized, _report = quantize_transformer(transformer, method, model)
    return quantized
