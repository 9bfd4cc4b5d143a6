"""Peak host RAM per process of ``qflux train`` with ``train.fsdp`` (issue 19, "Lean host RAM"): does it fall with
the process count?

    .venv/bin/python benchmarks/fsdp_host_ram.py [--steps 2] [--resolution 64] [--dtype bfloat16]
    .venv/bin/python benchmarks/fsdp_host_ram.py --malloc-mmap-threshold 131072   # glibc without its dynamic threshold

The model: ``benchmarks/quant_memory.py``'s Kontext-shaped ``FluxTransformer2DModel`` (``MODEL``, imported: 6 double
+ 12 single blocks, 4 heads x 128) with the text widths of the ``builtin:tiny`` CLIP and T5 (so the tiny encoders
fit: ``joint_attention_dim`` 64, ``pooled_projection_dim`` 32), random init under seed 0, saved once in
``--dtype`` with the tiny VAE and encoders as a diffusers folder in a temp dir. Runs (each a fresh ``accelerate
launch`` of ``qflux train``, CPU, gloo, ``OMP_NUM_THREADS=1``; LoRA r16 on quant_memory's ``LORA_TARGETS``,
batch 1, ``builtin:shapes``, no cache, no validation):

- ``fsdp x1``: ``train.fsdp: true`` on one process (nothing to shard: the whole model is loaded);
- ``fsdp x2``: ``train.fsdp: true`` on two processes: each builds the model without weights and reads only its
  shards (``qflux.training.sharded_load``);
- ``ddp x2``: ``train.fsdp: false`` on two processes: each loads the whole model (what ``train.fsdp`` did before
  the sharded load, too).

Per process, from ``/proc/self/status`` in the process itself (``qflux.run.models.training_models`` wrapped):
``start`` = VmRSS when the transformer's load begins (libraries, data and the freed encoders: the same in every
run), then the peak (VmHWM, reset through ``/proc/self/clear_refs`` between phases) before the load, during the
load (until the adapter is attached and the base sharded) and during the steps. A whole load maps the
safetensors file, so its weights enter the RSS as the first step touches them (in ``steps``, not ``load``).
The last lines: the means per process of the peak above ``start`` (what the model and the steps add) and of the
process peak, and their ratios: ``fsdp x2 / ddp x2`` at the same process count (the whole base in every process
before the sharded load), ``fsdp x2 / fsdp x1`` (the process count doubled).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # quant_memory's MODEL and LORA_TARGETS
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


# --------------------------------------------------------------------------- one process of a run


def worker(out: Path, config: Path) -> None:
    """One process of ``accelerate launch``: ``qflux train CONFIG``, then its peak RSS into OUT/rank<N>.json."""
    import diffusers  # noqa: F401  (the libraries every run loads, before the baseline is read)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import qflux.run.models as models
    from qflux.cli.main import main

    rank = int(os.environ.get("RANK", "0"))
    libs = _status_kib("VmRSS")
    loaded = {}
    training_models = models.training_models

    def watched(*args, **kwargs):  # the peaks before, during and after the transformer's load (sharded or whole)
        gc.collect()
        loaded.update(before_peak_kib=_status_kib("VmHWM"), before_rss_kib=_status_kib("VmRSS"))
        _reset_peak()
        found = training_models(*args, **kwargs)
        loaded.update(load_peak_kib=_status_kib("VmHWM"), load_rss_kib=_status_kib("VmRSS"),
                      load_anon_kib=_status_kib("RssAnon"), load_file_kib=_status_kib("RssFile"))
        _reset_peak()
        return found

    models.training_models = watched

    def report() -> None:
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "libs_kib": libs, **loaded,
                                                          "peak_kib": _status_kib("VmHWM")}))

    atexit.register(report)
    main(["train", str(config)])


# --------------------------------------------------------------------------- the model and the runs


def model_config() -> dict:
    from quant_memory import MODEL

    from qflux_kontext.tiny import TRANSFORMER_CONFIG

    return dict(MODEL, joint_attention_dim=TRANSFORMER_CONFIG["joint_attention_dim"],
                pooled_projection_dim=TRANSFORMER_CONFIG["pooled_projection_dim"])


def build_folder(folder: Path, dtype_name: str) -> tuple[int, int]:
    """The diffusers folder; returns (parameters, bytes of the transformer's weights in ``dtype_name``)."""
    import torch
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    from qflux_kontext.tiny import build_tiny_components

    components = build_tiny_components()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**model_config()).to(getattr(torch, dtype_name))
    components["transformer"] = transformer
    FluxKontextPipeline(**components).save_pretrained(folder)
    params = sum(p.numel() for p in transformer.parameters())
    return params, sum(p.numel() * p.element_size() for p in transformer.parameters())


def write_config(tmp: Path, folder: Path, fsdp: bool, args: argparse.Namespace) -> Path:
    import yaml
    from quant_memory import LORA_TARGETS

    data = {
        "trainer": "kontext",
        "model": {"pretrained": str(folder), "dtype": args.dtype,
                  "lora": {"rank": 16, "alpha": 16, "targets": list(LORA_TARGETS)}},
        "data": {"path": "builtin:shapes", "resolution": args.resolution, "num_samples": 4 * args.steps,
                 "holdout": 0, "control_resolution": "target"},
        "cache": {"enabled": False, "dir": str(tmp / "cache")},
        "train": {"max_steps": args.steps, "batch_size": 1, "save_every": 0, "fsdp": fsdp},
        "validation": {"every": 0},
        "output": {"dir": str(tmp / "run")},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch(tmp: Path, config: Path, processes: int, mmap_threshold: int | None) -> list[dict]:
    out = tmp / "rss"
    out.mkdir()
    # the tests' launch settings (tests/distributed): --multi_gpu picks the torchrun launcher, gloo on CPU
    cmd = [str(ACCELERATE), "launch", "--multi_gpu" if processes > 1 else "--cpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(Path(__file__).resolve()), "--worker", str(out), str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", QFLUX_TEST_FORK="0")
    if mmap_threshold:  # glibc: a fixed threshold, so freed large buffers go back to the OS at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"qflux train ({processes} processes) failed:\n{proc.stderr[-4000:]}")
    found = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    print(json.dumps(found), file=sys.stderr, flush=True)  # the raw figures, kept in the log
    return found


RUNS = (("fsdp x1", True, 1), ("fsdp x2", True, 2), ("ddp x2", False, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the runs (e.g. 131072: no dynamic threshold)")
    parser.add_argument("--runs", help="a comma-separated subset of: " + ", ".join(r[0] for r in RUNS))
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return

    runs = [r for r in RUNS if r[0] in args.runs.split(",")] if args.runs else list(RUNS)
    with tempfile.TemporaryDirectory(prefix="fsdp-host-ram-") as root:
        root = Path(root)
        params, base_bytes = build_folder(root / "model", args.dtype)
        results = {}
        for name, fsdp, processes in runs:
            tmp = root / name.replace(" ", "-")
            tmp.mkdir()
            results[name] = launch(tmp, write_config(tmp, root / "model", fsdp, args), processes,
                                   args.malloc_mmap_threshold)
            print(f"measured {name}", file=sys.stderr, flush=True)
    print(table(results, params, base_bytes, args))


def table(results: dict[str, list[dict]], params: int, base_bytes: int, args: argparse.Namespace) -> str:
    lines = [f"Kontext-shaped FluxTransformer2DModel (benchmarks/quant_memory.py MODEL, tiny text widths): "
             f"{params / 1e6:.1f}M parameters, {base_bytes / 2**20:.0f} MiB in {args.dtype}; qflux train on CPU "
             f"(gloo), {args.steps} steps at {args.resolution}px, LoRA r16. MiB per process: 'start' = RSS when the "
             "transformer's load begins (libraries, data, encoders freed); peaks (VmHWM, reset between phases) "
             "of the phases before the load, the load (until the adapter is attached and the base sharded), "
             "and the steps; '+' = above start; glibc malloc "
             + (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else
                "defaults (dynamic mmap threshold)")]
    head = (f"{'run':<8} {'rank':>4} {'start':>6} {'before':>7} {'load':>6} {'+load':>6} {'steps':>6} {'+steps':>6} "
            f"{'process peak':>12}")
    lines += [head, "-" * len(head)]
    means = {}
    for name, rows in results.items():
        per = []
        for r in rows:
            start, load, steps = r["before_rss_kib"] / 1024, r["load_peak_kib"] / 1024, r["peak_kib"] / 1024
            peak = max(r["before_peak_kib"] / 1024, load, steps)
            per.append((peak - start, peak))
            lines.append(f"{name:<8} {r['rank']:>4} {start:>6.0f} {r['before_peak_kib'] / 1024:>7.0f} {load:>6.0f} "
                         f"{load - start:>6.0f} {steps:>6.0f} {steps - start:>6.0f} {peak:>12.0f}")
        means[name] = [sum(x[i] for x in per) / len(per) for i in range(2)]
    lines += ["", f"{'mean per process':<18} {'peak - start':>12} {'process peak':>12}"]
    lines += [f"{name:<18} {m[0]:>12.0f} {m[1]:>12.0f}" for name, m in means.items()]
    for a, b in (("fsdp x2", "ddp x2"), ("fsdp x2", "fsdp x1"), ("ddp x2", "fsdp x1")):
        if a in means and b in means:
            lines.append(f"{a + ' / ' + b:<18} {means[a][0] / means[b][0]:>12.2f} {means[a][1] / means[b][1]:>12.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
