"""The names of the files qflux writes into a run folder (``output.dir``) and its checkpoints: one place,
read by the writers (``training.checkpoint``, the adapters' export) and by the readers (resume, ``qflux
sample --lora``, the run-folder rules)."""

LORA_FILE = "pytorch_lora_weights.safetensors"  # the final adapter file, in diffusers' format
CHECKPOINTS = "checkpoints"  # output.dir/checkpoints/step-NNNNNN/
CHECKPOINT_ADAPTER = "lora.safetensors"  # the adapter's state in a checkpoint (Adapter.state_dict)
CHECKPOINT_TRAINING = "training_state.pt"  # optimizer and LR scheduler
CHECKPOINT_STATE = "state.json"  # position and config fingerprint
CHECKPOINT_MANIFEST = "manifest.json"  # sizes and sha256 of the files above
