"""qflux: LoRA training for image-editing diffusion models (core: hooks, CLI, config, data, training)."""

from qflux.hookspecs import hookimpl

__version__ = "0.5.0"

__all__ = ["__version__", "hookimpl"]
