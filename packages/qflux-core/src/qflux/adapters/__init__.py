"""Adapters: the trainable parameters attached to a frozen base (LoRA today; LoKr, LoHa, DoRA as plugins).

``base.Adapter`` is the seam: the run calls its methods for the ``model.adapter`` selected, so an
adapter kind registered by a plugin (``qflux_register_adapters``) trains, checkpoints, resumes and exports
with no change to the core. ``lora.LoraAdapter`` is the core's own.
"""
