"""Launched by tests/distributed/test_dead_rank.py through ``accelerate launch``: trains, and rank 1 dies (or
hangs) at a chosen point, deterministically.

usage: run_dead_rank.py CONFIG OUT_DIR POINT [--resume]

POINT: ``step:N`` (rank 1 SIGKILLs itself in its N-th training forward, i.e. mid-step N of this invocation),
``validation`` (in its first validation sample after training started), ``hang:N`` (rank 1 sleeps in its N-th
training forward and never reaches the gradient all-reduce: only the collective timeout ends the run) or
``none``. Before dying, rank 1 writes OUT_DIR/dead.json with the time, so the test measures how long the
others take to end. A run that finishes writes OUT_DIR/lora-rank{R}.safetensors.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from qflux.config import load_config
from qflux.run.train import train
from qflux.testing import spied_registry


class DeadRank:
    def __init__(self, point: str, out: Path, rank: int) -> None:
        self.kind, _, n = point.partition(":")
        self.n = int(n or 0)
        self.out, self.rank = out, rank
        self.forwards = 0  # training forwards (gradients on) of this process

    def die(self, where: str, hang: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "dead.json").write_text(json.dumps({"time": time.time(), "where": where, "pid": os.getpid()}))
        if hang:
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)

    def predict(self, inner, transformer, batch, noisy, model):
        if torch.is_grad_enabled():
            self.forwards += 1
            if self.rank == 1 and self.kind in ("step", "hang") and self.forwards == self.n:
                self.die(f"training forward {self.n}", hang=self.kind == "hang")
        return inner(transformer, batch, noisy, model)

    def sample(self, inner, *args, **kwargs):
        if self.rank == 1 and self.kind == "validation" and self.forwards > 0:
            self.die("validation sample")
        return inner(*args, **kwargs)


def main() -> None:
    config, out, point = load_config(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    spy = DeadRank(point, out, rank)
    result = train(config, registry=spied_registry(spy), resume="--resume" in sys.argv)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.lora, str(out / f"lora-rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
