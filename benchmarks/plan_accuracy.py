"""``qflux plan``'s predicted peak host RAM against the measured peak RSS of real ``qflux train`` runs (issue 19).

    .venv/bin/python benchmarks/plan_accuracy.py [--steps 2] [--models tiny,m100] [--resolutions 256,512]

On this machine (no accelerator) a run holds everything in host RAM, libraries included, so the plan's
``host_gib`` (``qflux plan --json --device cpu``) is compared with the run's peak resident set (``ru_maxrss`` of
the ``qflux train`` child, from ``os.wait4``; this script imports no torch itself, since a child's ``ru_maxrss``
includes the parent's pages it was forked with). Models, each saved once as a diffusers folder in a temp dir with
the ``builtin:tiny`` CLIP, T5 and VAE (so the encoders' widths fit):

- ``tiny``: ``builtin:tiny``'s Kontext transformer (0.9 M parameters);
- ``m100``: a Kontext-shaped ``FluxTransformer2DModel`` of ~100 M parameters (4 heads x 128, 6 double + 12
  single blocks, the tiny encoders' widths), float32.

The prompt length is stated (``model.max_sequence_length: 32``, the tiny T5's), as the plan cannot read it from
a folder. Each model runs at every resolution with gradient checkpointing off and on: LoRA r16 on to_q/k/v/out.0, batch 1,
AdamW, ``builtin:shapes`` (a control at the target's size), no cache (the encoders load, encode, are freed),
no validation. Printed per run: predicted, measured, their ratio and the plan's peak phase; the target is every
ratio within 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QFLUX = [sys.executable, "-m", "qflux"]
GiB = 2**30


def m100_config() -> dict:
    from qflux_kontext.tiny import TRANSFORMER_CONFIG

    return dict(TRANSFORMER_CONFIG, num_attention_heads=4, attention_head_dim=128, num_layers=6,
                num_single_layers=12, axes_dims_rope=(16, 56, 56))


def build_folder(folder: Path, model: str) -> Path:
    import torch
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    from qflux_kontext.tiny import build_tiny_components

    components = build_tiny_components()
    if model == "m100":
        torch.manual_seed(1)
        components["transformer"] = FluxTransformer2DModel(**m100_config())
    elif model != "tiny":
        raise SystemExit(f"unknown model {model}")
    FluxKontextPipeline(**components).save_pretrained(folder)
    return folder


def config(tmp: Path, folder: Path, resolution: int, checkpointing: bool, steps: int) -> Path:
    data = {
        "trainer": "kontext",
        # the tiny T5's 32 tokens (the real Kontext's 512 is the trainer's default for the plan): stated, so the
        # plan and the run see the same prompt length
        "model": {"pretrained": str(folder), "dtype": "float32", "gradient_checkpointing": checkpointing,
                  "max_sequence_length": 32,
                  "lora": {"rank": 16, "alpha": 16, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}},
        "data": {"path": "builtin:shapes", "resolution": resolution, "num_samples": 4, "holdout": 0,
                 "control_resolution": "target"},
        "cache": {"enabled": False, "dir": str(tmp / "cache")},
        "train": {"max_steps": steps, "batch_size": 1, "save_every": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def predicted(path: Path, env: dict) -> dict:
    out = subprocess.run([*QFLUX, "plan", str(path), "--json", "--device", "cpu"], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def measured(path: Path, env: dict) -> int:
    """Peak RSS in bytes of ``qflux train`` (its own process: ``wait4`` returns that child's rusage)."""
    child = subprocess.Popen([*QFLUX, "train", str(path)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"qflux train failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--models", default="tiny,m100")
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_folder(Path(args.build[1]), args.build[0])
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", QFLUX_TEST_FORK="0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as root:
        root = Path(root)
        for model in args.models.split(","):
            # built by a child: a child's ru_maxrss counts its parent's pages up to its exec, so this process
            # must never hold torch or a model
            folder = root / model
            subprocess.run([sys.executable, __file__, "--build", model, str(folder)], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for resolution in (int(r) for r in args.resolutions.split(",")):
                for ckpt in (False, True):
                    tmp = root / f"{model}-{resolution}-{int(ckpt)}"
                    tmp.mkdir()
                    path = config(tmp, folder, resolution, ckpt, args.steps)
                    plan = predicted(path, env)
                    rss = measured(path, env)
                    ratio = plan["host_gib"] * GiB / rss
                    rows.append(ratio)
                    print(f"{model:5} {resolution:4d}px checkpointing {'on ' if ckpt else 'off'}  predicted "
                          f"{plan['host_gib']:6.3f} GiB ({plan['peak_phase']['host']:6})  measured "
                          f"{rss / GiB:6.3f} GiB  predicted/measured {ratio:5.3f}", flush=True)
    worst = max(abs(r - 1) for r in rows)
    print(f"largest error {worst:.1%} over {len(rows)} runs (target: within 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
