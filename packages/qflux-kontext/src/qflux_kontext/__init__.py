"""qflux-kontext: the ``kontext`` trainer plugin (FLUX.1 Kontext) for qflux.

The plugin module (``qflux_kontext.plugin``, the ``qflux`` entry point) stays light: torch, diffusers and
transformers are imported inside the hook bodies. The heavy modules, one job each:

- ``tiny``: the ``builtin:tiny`` model (real classes at tiny sizes, deterministic, offline), ``save_tiny``
- ``tiny_tokenizers``: the CLIP (byte-level BPE) and T5 (Unigram) tokenizers made locally
- ``loading``: load the transformer / encoders from ``builtin:tiny``, a diffusers folder or a hub id
- ``encoders``: ``KontextEncoders``, the typed object ``Trainer.load_encoders`` returns
- ``encoding``: VAE latents, prompt embeddings, token-space masks -> ``EncodedSample``
- ``packing``: 2x2 packing of latents and the ``(index, row, col)`` image ids
- ``predict``: the transformer forward of one training step
- ``sampling``: validation / inference images through ``FluxKontextPipeline``

``shapes_base/`` (package data) is ``builtin:shapes-base``: a diffusers folder of a tiny FLUX.1 Kontext pretrained
on ``builtin:shapes`` by ``scripts/build_shapes_base.py`` (deterministic; float16 safetensors, ~2.3 MB). The
core's ``qflux.model_source`` reads the name as this folder, so it loads through ``loading`` like any folder.
"""

__version__ = "0.5.0"
