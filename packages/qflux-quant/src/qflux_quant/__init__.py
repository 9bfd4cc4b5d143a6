"""qflux-quant: quantization backends for qflux (bitsandbytes nf4 / fp4 / int8, fp8 weight-only).

Importing this package (or its ``plugin`` entry point) imports neither torch nor bitsandbytes; the backends
load on first use (``qflux_quant.quantize``).
"""

__version__ = "0.5.0"
