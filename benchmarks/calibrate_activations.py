"""Measure the activation coefficients of every installed trainer's blocks (``MemoryProfile.activations``).

    .venv/bin/python benchmarks/calibrate_activations.py [--resolution 128] [--trainers kontext,...]

One training step of each trainer's ``builtin:tiny`` model (LoRA r4 on the default targets, ``--dtype``: float32,
or a bfloat16 base under the float32 adapter as real runs train, whose coefficients are ``MemoryProfile.half``;
no checkpointing) under ``qflux.plan.probe.SavedBytesProbe``: per block class, the bytes autograd keeps for
backward divided by tokens x width x element size (the median over the block's calls), next to the value the
trainer declares. A trainer's ``MemoryProfile`` takes these figures; tests/plan/test_plan.py fails when a
declared value is more than 8 % off a measured step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from qflux.config import load_config
    from qflux.plugins import build_registry
    from qflux.testing import probed_step, tiny_config, write_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trainers", default="")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model.dtype (bfloat16: a half-precision base under a float32 adapter)")
    args = parser.parse_args(argv)
    registry = build_registry()
    names = args.trainers.split(",") if args.trainers else sorted(registry.trainers)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            config = load_config(write_config(tmp / "c.yaml", tiny_config(
                tmp, name, train={"max_steps": 1, "save_every": 0, "batch_size": 1},
                data={"num_samples": 4, "holdout": 0, "resolution": args.resolution},
                model={"pretrained": "builtin:tiny", "dtype": args.dtype, "lora": {"rank": 4, "alpha": 4}})))
            probe = probed_step(config, name)
        memory = registry.trainer(name).info.memory
        declared = dict((memory.half if args.dtype != "float32" else memory.activations) or ()) if memory else {}
        for cls, value in probe.coefficients().items():
            print(f"{name:16} {cls:30} measured {value:6.2f}  declared {declared.get(cls, float('nan')):6.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
