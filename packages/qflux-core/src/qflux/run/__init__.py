"""The application layer: what one command does, from checks to the written LoRA.

``preflight`` runs every check that needs no model before anything is written; ``cache`` fills the embedding
cache (``qflux cache``, ``train --cache``); ``models`` builds the model bundle (transformer, quantizer,
adapter, encoders) for ``train`` and ``qflux sample``; ``train`` runs training as a short list of phases.
This layer may import every other part of the core; nothing below it imports it (tests/test_architecture.py).
"""
