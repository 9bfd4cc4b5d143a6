"""Launched by the tests through ``accelerate launch``: trains, then dumps this rank's LoRA and seen samples.

usage: run_rank.py CONFIG OUT_DIR [--resume]
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from qflux import hookimpl
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.training.loop import train


class SeenSamples:
    """Records the sample keys of every training forward (gradients on) of this process."""

    def __init__(self) -> None:
        self.keys: list[list[str]] = []

    @hookimpl(hookwrapper=True)
    def qflux_predict(self, trainer, transformer, batch, noisy, model):
        if torch.is_grad_enabled():
            self.keys.append(list(batch.keys))
        yield


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    spy = SeenSamples()
    result = train(config, registry=build_registry(extra_plugins=[("seen", spy)]), resume="--resume" in sys.argv)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.lora, str(out / f"lora-rank{rank}.safetensors"))
    (out / f"seen-rank{rank}.json").write_text(json.dumps({"batches": spy.keys, "world": int(
        os.environ.get("WORLD_SIZE", "1")), "val_start": result.val_loss_start, "val_end": result.val_loss_end}))


if __name__ == "__main__":
    main()
