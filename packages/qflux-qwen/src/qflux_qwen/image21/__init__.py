"""The ``qwen-image-2.1`` trainer: Qwen-Image 2.1 image-conditioned generation (``QwenImage21Pipeline``).

Qwen-Image 2.1 is one single-stream, block-causal transformer (``QwenImage21Transformer2DModel``) over one
interleaved sequence: the prompt and the condition images are encoded together by Qwen3-VL, the VL encoder's image
slots (one per 2x2 latent tokens) are filled with the condition images' VAE latents, and the target image's tokens
are appended. Modules, one job each (light ones first):

- ``info``: the trainer's registration facts (no torch import)
- ``tiny``: ``builtin:tiny`` (real classes at tiny sizes, offline)
- ``loading``: components from ``builtin:tiny``, a diffusers folder or a hub id; ``Image21Encoders``
- ``encoding``: VAE latents and the Qwen3-VL prompt with its image slots -> ``EncodedSample``
- ``predict``: the transformer forward of one training step
- ``sampling``: validation / inference images with the pipeline's denoising loop
"""
