"""qflux train against diffusers' Kontext LoRA example script on one diffusers folder (issue 18).

Both run as separate processes on the same saved FluxKontext folder (step_overhead's ~9.4 M-parameter
Kontext-shaped transformer with the builtin:tiny VAE, CLIP and T5) and the same Hugging Face dataset folder
(builtin:shapes pairs at 256 x 256, columns target / control / prompt), with identical settings: batch 1, LoRA
r16 (alpha 16) on to_q, to_k, to_v, to_out.0, 32 T5 tokens, float32, AdamW lr 1e-4, constant schedule, no
validation, no checkpoints, the control at the target's size. The peer is the unmodified copy in
../shared/peers/ (never imported, never copied: run as ``python SCRIPT ARGS``).

Each variant runs for two lengths (``--short``, ``--long`` optimizer steps) and a whole ``--whole``-step run;
rounds interleave the variants (the order rotates each round) and the figures are medians over rounds:

- per-step time = (T(long) - T(short)) / (long - short): start-up, loading, encoding and compilation cancel;
- whole-run time = T(whole), everything from the process start to its exit.

Ratios are peer / qflux (above 1: qflux is faster). Variants: ``peer``; ``qflux`` (uncached: encodes the
dataset every run, like the peer); ``qflux-cached`` (the embedding cache built before the rounds);
``qflux-compile`` (``train.compile: true``, uncached; one warm-up run first fills inductor's on-disk cache, as
any second run on a machine finds it, so every timed run starts equally warm). torch runs one thread in every process
(``--threads``), so two busy cores do not turn thread scheduling into noise.

    .venv/bin/python benchmarks/peer_speed.py [--rounds 3] [--short 4] [--long 16] [--whole 10]
        [--variants peer,qflux,qflux-cached,qflux-compile] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peers" / "train_dreambooth_lora_flux_kontext.py"
RESOLUTION = 256
TOKENS = 32
RANK = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SAMPLES = 8


def build_model(folder: Path) -> Path:
    """The builtin:tiny Kontext pipeline with step_overhead's widened transformer, saved as a diffusers folder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from diffusers import FluxKontextPipeline
    from step_overhead import bench_transformer

    from qflux_kontext.tiny import build_tiny_components

    components = build_tiny_components()
    components["transformer"] = bench_transformer().requires_grad_(True).train()
    FluxKontextPipeline(**components).save_pretrained(folder)
    return folder


def build_dataset(folder: Path) -> Path:
    """builtin:shapes pairs as a Hugging Face dataset folder (one parquet file, Image columns)."""
    from datasets import Dataset, Features, Image, Value

    from qflux.config.schema import DataConfig
    from qflux.data.shapes import shapes_records

    rows: dict[str, list] = {"target": [], "control": [], "prompt": []}
    for record in shapes_records(DataConfig(path="builtin:shapes", resolution=RESOLUTION, num_samples=SAMPLES)):
        rows["target"].append(record.target.image)
        rows["control"].append(record.controls[0].image)
        rows["prompt"].append(record.prompt)
    features = Features({"target": Image(), "control": Image(), "prompt": Value("string")})
    data = folder / "data"
    data.mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(data / "train-00000-of-00001.parquet"))
    return folder


def qflux_config(tmp: Path, model: Path, data: Path, steps: int, *, cache: bool, compile: bool) -> Path:
    import yaml

    config = {
        "trainer": "kontext",
        "model": {"pretrained": str(model), "dtype": "float32", "max_sequence_length": TOKENS,
                  "lora": {"rank": RANK, "alpha": RANK, "targets": TARGETS}},
        "data": {"path": f"hf:{data}", "resolution": [RESOLUTION, RESOLUTION], "control_resolution": "target",
                 "holdout": 0},
        "cache": {"enabled": cache, "dir": str(tmp / "qflux-cache")},
        "train": {"max_steps": steps, "batch_size": 1, "lr": 1e-4, "optimizer": "adamw", "scheduler": "constant",
                  "mixed_precision": "no", "save_every": 0, "seed": 0, "compile": compile},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / f"qflux-run-{time.monotonic_ns()}")},
    }
    path = tmp / f"qflux-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def peer_args(tmp: Path, model: Path, data: Path, steps: int) -> list[str]:
    return [str(PEER), "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data),
            "--image_column", "target", "--cond_image_column", "control", "--caption_column", "prompt",
            "--output_dir", str(tmp / f"peer-run-{time.monotonic_ns()}"), "--resolution", str(RESOLUTION),
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--rank", str(RANK),
            "--lora_alpha", str(RANK), "--lora_layers", ",".join(TARGETS), "--max_sequence_length", str(TOKENS),
            "--mixed_precision", "no", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--seed", "0",
            "--dataloader_num_workers", "0", "--instance_prompt", "edit", "--guidance_scale", "1"]


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=16)
    parser.add_argument("--whole", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="peer,qflux,qflux-cached,qflux-compile")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if not PEER.exists():
        raise SystemExit(f"the peer script is not at {PEER} (see ../shared/peers/README.md)")

    tmp = Path(tempfile.mkdtemp(prefix="qflux-peer-speed-"))
    model, data = build_model(tmp / "model"), build_dataset(tmp / "dataset")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    qflux = str(Path(sys.executable).with_name("qflux"))

    def run(variant: str, steps: int) -> float:
        if variant == "peer":
            return timed([sys.executable, *peer_args(tmp, model, data, steps)], env, tmp)
        config = qflux_config(tmp, model, data, steps, cache=variant == "qflux-cached",
                              compile=variant == "qflux-compile")
        return timed([qflux, "train", "--config", str(config)], env, tmp)

    if "qflux-cached" in variants:  # the cache is built once, before the rounds (what a second run finds)
        config = qflux_config(tmp, model, data, 1, cache=True, compile=False)
        timed([qflux, "cache", "--config", str(config)], env, tmp)

    if "qflux-compile" in variants:  # inductor keeps compiled code on disk: the first run alone would pay it
        config = qflux_config(tmp, model, data, 2, cache=False, compile=True)
        print(f"qflux-compile warm-up (compiles and fills inductor's cache): "
              f"{timed([qflux, 'train', '--config', str(config)], env, tmp):.1f} s", flush=True)

    times: dict[tuple[str, int], list[float]] = {}
    lengths = sorted({args.short, args.long, args.whole})
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            for steps in lengths:
                seconds = run(variant, steps)
                times.setdefault((variant, steps), []).append(seconds)
                print(f"round {r + 1} {variant:14s} {steps:3d} steps {seconds:7.1f} s", flush=True)

    def per_step(variant: str, r: int) -> float:
        return (times[(variant, args.long)][r] - times[(variant, args.short)][r]) / (args.long - args.short)

    def median_ratio(f: Callable[[str, int], float], variant: str) -> float:
        return statistics.median(f("peer", r) / f(variant, r) for r in range(args.rounds))

    def whole(variant: str, r: int) -> float:
        return times[(variant, args.whole)][r]

    print(f"\n{args.rounds} rounds, {args.threads} torch thread(s); per-step from {args.short} and {args.long} steps; "
          f"whole run: {args.whole} steps")
    for variant in variants:
        step_ms = statistics.median(per_step(variant, r) for r in range(args.rounds)) * 1000
        whole_s = statistics.median(whole(variant, r) for r in range(args.rounds))
        line = f"{variant:14s} per step {step_ms:7.1f} ms   whole {args.whole}-step run {whole_s:6.1f} s"
        if variant != "peer" and "peer" in variants:
            line += (f"   peer/qflux: per step {median_ratio(per_step, variant):.2f}x, "
                     f"whole run {median_ratio(whole, variant):.2f}x")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
