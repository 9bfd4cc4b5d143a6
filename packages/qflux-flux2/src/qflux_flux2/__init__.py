"""qflux-flux2: the FLUX.2 trainer plugins for qflux: ``flux2-dev`` (FLUX.2 [dev], ``Flux2Pipeline``) and
``flux2-klein`` (FLUX.2 [klein] base 4B / 9B, ``Flux2KleinPipeline``), with 0..N reference images per sample.

The plugin module (``qflux_flux2.plugin``, the ``qflux`` entry point) and this package stay light: torch,
diffusers and transformers are imported inside the hook bodies (the public names below load on first use).
The modules, one job each:

- ``variants``: the two trainers and their switches (light)
- ``options``: the trainers' own config keys (``model.options``)
- ``tiny`` / ``tiny_tokenizers``: the ``builtin:tiny`` models (real classes at tiny sizes, offline), ``save_tiny``
- ``loading``: load the transformer / encoders from ``builtin:tiny``, a diffusers folder or a hub id
- ``encoders``: ``Flux2Encoders``, the typed object ``Trainer.load_encoders`` returns
- ``encoding``: VAE latents, prompt embeddings, token-space masks -> ``EncodedSample``
- ``predict``: the transformer forward of one training step (4-axis RoPE ids)
- ``shift``: the empirical-mu timestep shift (``Trainer.shift_rule``)
- ``sampling``: validation / inference images with the pipelines' denoising loop
"""

from __future__ import annotations

from typing import Any

__version__ = "0.5.0"

_LAZY = {
    "build_tiny_pipeline": "qflux_flux2.tiny",
    "save_tiny": "qflux_flux2.tiny",
    "Flux2Encoders": "qflux_flux2.encoders",
    "VARIANTS": "qflux_flux2.variants",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qflux_flux2' has no attribute {name!r}")
