"""qflux-qwen: the Qwen-Image-Edit trainer plugins for qflux: ``qwen-edit`` (Qwen-Image-Edit),
``qwen-edit-plus`` (Edit-2509) and ``qwen-edit-2511`` (Edit-2511).

The plugin module (``qflux_qwen.plugin``, the ``qflux`` entry point) and this package stay light: torch,
diffusers and transformers are imported inside the hook bodies (the public names below load on first use).
The heavy modules, one job each:

- ``variants``: the three trainers and their switches (light)
- ``tiny``: the ``builtin:tiny`` model (real classes at tiny sizes, deterministic, offline), ``save_tiny``
- ``tiny_tokenizer``: the Qwen2 byte-level BPE tokenizer made locally
- ``loading``: load the transformer / encoders from ``builtin:tiny``, a diffusers folder or a hub id
- ``encoders``: ``QwenEncoders``, the typed object ``Trainer.load_encoders`` returns
- ``encoding``: VAE latents, Qwen2.5-VL prompt embeddings, token-space masks -> ``EncodedSample``
- ``predict``: the transformer forward of one training step
- ``sampling``: validation / inference images with the pipelines' denoising loop
"""

from __future__ import annotations

from typing import Any

__version__ = "0.5.0"

_LAZY = {
    "build_tiny_pipeline": "qflux_qwen.tiny",
    "save_tiny": "qflux_qwen.tiny",
    "QwenEncoders": "qflux_qwen.encoders",
    "VARIANTS": "qflux_qwen.variants",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qflux_qwen' has no attribute {name!r}")
