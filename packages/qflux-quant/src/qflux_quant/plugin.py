"""The qflux plugin (entry point ``quant``): registers the quantizers nf4, fp4, int8, fp8 as ``Quantizer``
objects. Light on purpose: torch and bitsandbytes are imported inside the methods only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qflux import hookimpl
from qflux.plugin_api import Quantizer, QuantizerInfo
from qflux_quant.methods import METHODS, Method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qflux.plugin_api import ModelConfig


class MethodQuantizer(Quantizer):
    """One quantization method of this package (``qflux_quant.methods``)."""

    def __init__(self, method: Method) -> None:
        self.method = method
        super().__init__(QuantizerInfo(name=method.name, description=method.description, requires=method.requires))

    def check(self, model: ModelConfig) -> None:
        """A missing bitsandbytes or an unsupported combination, reported before minutes of encoding and loading."""
        from qflux_quant.quantize import check_supported

        check_supported(self.method.name, model)

    def quantize(self, transformer: torch.nn.Module, model: ModelConfig) -> torch.nn.Module:
        from qflux_quant.quantize import quantize_transformer

        quantized, _report = quantize_transformer(transformer, self.method.name, model)
        return quantized

    def planned_bytes(self, transformer: torch.nn.Module, model: ModelConfig) -> dict[str, int]:
        from qflux_quant.planning import planned_bytes

        return planned_bytes(transformer, self.method.name, model.quantize_skip)


QUANTIZERS: dict[str, MethodQuantizer] = {name: MethodQuantizer(method) for name, method in METHODS.items()}


@hookimpl
def qflux_register_quantizers(register: Callable[[Quantizer], None]) -> None:
    for quantizer in QUANTIZERS.values():
        register(quantizer)
