"""The model-agnostic training engine: batching, timesteps, LoRA, checkpoints and the loop."""
