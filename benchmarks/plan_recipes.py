"""``qflux plan``'s accelerator figures for the recipes in configs/, on the full-size transformers (issue 19).

    .venv/bin/python benchmarks/plan_recipes.py [--budget 12]

The recipes name hub models, which the plan cannot build offline; this script hands ``qflux.plan.plan_memory``
the same transformer built on the meta device from the diffusers class defaults (benchmarks/vram_estimate.py's
builders: FLUX.1 Kontext-dev, Qwen-Image-Edit, FLUX.2), so nothing is downloaded. Per recipe: the training
phase's accelerator bytes (weights, adapter + AdamW state, activations at the recipe's resolution with one
reference), its peak (validation included; the encoders are not counted: unknown offline, and a run frees them
before the transformer loads), and the smallest ``model.offload_blocks`` whose plan fits ``--budget`` GiB.
Predictions, not measurements: benchmarks/gpu_memory.py measures them on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPES = {
    "kontext-dev-bf16.yaml": "build_flux",
    "kontext-dev-nf4.yaml": "build_flux",
    "qwen-edit-2509-bf16.yaml": "build_qwen",
    "qwen-edit-2509-nf4.yaml": "build_qwen",
    "qwen-edit-2511-nf4.yaml": "build_qwen",
    "flux2-dev-nf4.yaml": "build_flux2_dev",
}


def main(argv: list[str] | None = None) -> int:
    import vram_estimate

    from qflux.config import load_config
    from qflux.plan.estimate import GiB, gather, plan
    from qflux.plan.fit import smallest_offload
    from qflux.plugins import build_registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=12.0, help="GiB for the offloading column")
    args = parser.parse_args(argv)
    registry = build_registry()
    print(f"{'recipe':28} {'train GiB':>10} {'peak GiB':>9} {'phase':>9}  offload_blocks for {args.budget:g} GiB")
    for name, builder in RECIPES.items():
        config = load_config(REPO / "configs" / name)
        meta = vram_estimate.on_meta(getattr(vram_estimate, builder))
        inputs = gather(config, registry, transformer=meta, libraries=0)
        result = plan(config, inputs, True)
        phase, peak = result.peak("accelerator")
        n = smallest_offload(config, inputs, int(args.budget * GiB), True)
        print(f"{name:28} {result.phase_total('train', 'accelerator') / GiB:10.2f} {peak / GiB:9.2f} {phase:>9}  "
              f"{n if n is not None else 'does not fit'}" + (f" of {len(inputs.weights.blocks)}" if n is not None else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
