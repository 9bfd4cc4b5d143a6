"""Adapters: the trainable parameters attached to a frozen base.

``base.Adapter`` is the seam: the run calls its methods for the ``model.adapter`` selected, so an
adapter kind registered by a plugin (``qflux_register_adapters``) trains, checkpoints, resumes and exports
with no change to the core. The core's own: ``lora.LoraAdapter`` (``lora``, with DoRA and rsLoRA as options of
``model.lora``; files in ``lora_files``) and ``lycoris.LokrAdapter`` / ``LohaAdapter`` (``lokr``, ``loha``; files
in ``lycoris_files``).
"""
