"""Launched by the tests through ``accelerate launch``: trains, then dumps this rank's LoRA and seen samples.

usage: run_rank.py CONFIG OUT_DIR [--resume]
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from qflux.config import load_config
from qflux.run.train import train
from qflux.testing import spied_registry


class SeenSamples:
    """Records the sample keys of every training forward (gradients on) of this process, how many forwards
    of the transformer it ran in all (training, validation loss, sampling), and how much of the frozen base
    it holds (the local shards' sizes when the base is sharded)."""

    def __init__(self) -> None:
        self.keys: list[list[str]] = []
        self.forwards = 0
        self.base: dict[str, int] | None = None

    def predict(self, inner, transformer, batch, noisy, model):
        if torch.is_grad_enabled():
            self.keys.append(list(batch.keys))
        if self.base is None:
            self.base = holdings(transformer)
            transformer.register_forward_pre_hook(self.count)
            self.forwards += 1  # this one: the hook only sees the next ones
        return inner(transformer, batch, noisy, model)

    def count(self, module, args) -> None:
        self.forwards += 1


def holdings(transformer: torch.nn.Module) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    from qflux.training.sharding import local_numel

    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    lora = [p for p in transformer.parameters() if p.requires_grad]
    return {"base_total": sum(p.numel() for p in frozen),
            "base_local": sum(local_numel(p) for p in frozen),
            "base_sharded": sum(isinstance(p, DTensor) for p in frozen),
            "lora_sharded": sum(isinstance(p, DTensor) for p in lora), "lora": len(lora)}


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    spy = SeenSamples()
    result = train(config, registry=spied_registry(spy), resume="--resume" in sys.argv)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.lora, str(out / f"lora-rank{rank}.safetensors"))
    (out / f"seen-rank{rank}.json").write_text(json.dumps({"batches": spy.keys, "world": int(
        os.environ.get("WORLD_SIZE", "1")), "val_start": result.val_loss_start, "val_end": result.val_loss_end,
        "forwards": spy.forwards, **(spy.base or {})}))


if __name__ == "__main__":
    main()
