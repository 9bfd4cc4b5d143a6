"""What the embedding cache buys (issue 5 item 5), in one run.

Same model and data as ``step_overhead.py``: a ~9.4 M-parameter Kontext-shaped ``FluxTransformer2DModel`` with
LoRA r16, the ``builtin:tiny`` encoders (CLIP + T5 + VAE), ``builtin:shapes`` at 256x256 (256 target + 256
control tokens), batch 1, float32 on CPU. Prints:

- cache build: ``qflux.run.cache.build_cache`` over the dataset, samples/s (with and without the encoders'
  load time, which the benchmark plugin measures);
- steps/s, three variants timed interleaved in rounds (the order rotates each round):
    cached    each step reads its sample from the cache (``EmbeddingCache.get``: read, sha256 check, decode),
              then runs the training loop's step body (``step_overhead.QfluxStep``). ``train()`` itself reads
              every entry once at start-up and keeps them in memory, so this is a stricter variant;
    uncached  each step decodes, resizes and encodes its sample (``load_sample`` + ``Trainer.encode``), then the
              same step body: what a trainer without a cache does;
    bare      forward, MSE, backward, AdamW on prepared tensors (the limit, ``step_overhead.BareStep``);
- real runs of ``qflux.run.train.train``, each in its own subprocess: cache complete vs cache disabled;
  peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child, after ``train`` returns), how often
  ``Trainer.load_encoders`` was called (a counting hook wrapper: the proof that a cached run loads no encoder),
  and the loop's own steps/s from ``metrics.jsonl`` (median step interval);
- start-up with 10,000 entries: 10,000 small real entries (32x32 ``builtin:shapes`` samples, encoded) written
  with ``EmbeddingCache.put``; then the time to open the cache and check membership of every key (the index),
  and to open it and ``get`` every entry (what ``train()`` does at start with a complete cache);
- the mean time of ``EmbeddingCache.get`` for one 256-px entry.

Targets: cached >= 0.95x bare; start-up with 10,000 entries <= 2 s; one cached read <= 2 ms.

    .venv/bin/python benchmarks/cache_speedup.py [--rounds 12] [--steps 30] [--entries 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # noqa: E402 - the shared model, config and step definitions

TARGET_CACHED = 0.95
TARGET_STARTUP_S = 2.0
TARGET_READ_MS = 2.0


class TimedBenchPlugin(so.BenchPlugin):
    """``BenchPlugin`` that also times each ``Trainer.load_encoders`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_load_s = 0.0

    def load_encoders(self, inner, model):
        self.encoder_loads += 1
        t0 = time.perf_counter()
        try:
            return inner(model)
        finally:
            self.encoder_load_s += time.perf_counter() - t0


def rss_mib() -> float:
    """Peak RSS of this process, MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mib() -> float | None:
    """The kernel's own peak RSS of this process image (``VmHWM``), MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- child: one real training run


def child(tmp: Path, cached: bool, steps: int, threads: int) -> None:
    """Run ``train()`` on the benchmark config and print one JSON line (peak RSS, encoder loads, steps/s)."""
    if threads:
        torch.set_num_threads(threads)
    from rich.console import Console

    from qflux.config import load_config
    from qflux.run.train import train
    from qflux.testing import spied_registry
    from qflux.training.metrics import read_metrics

    rss_start = rss_mib()
    name = "cached" if cached else "uncached"
    config = load_config(tmp / "bench.yaml", overrides=[
        f"cache.enabled={'true' if cached else 'false'}", f"train.max_steps={steps}",
        f"output.dir={tmp / ('run-' + name)}"])
    plugin = so.BenchPlugin()
    registry = spied_registry(plugin, trainer="kontext")
    t0 = time.perf_counter()
    train(config, registry=registry, console=Console(stderr=True, quiet=True))
    wall = time.perf_counter() - t0
    peak, hwm = rss_mib(), vm_hwm_mib()
    rows = [r for r in read_metrics(Path(config.output.dir) / "metrics.jsonl") if "elapsed" in r]
    intervals = [b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:], strict=False)][5:]
    out = {"peak_rss_mib": peak, "vm_hwm_mib": hwm, "rss_after_imports_mib": rss_start,
           "encoder_loads": plugin.encoder_loads, "steps_per_s": 1 / statistics.median(intervals), "wall_s": wall}
    if cached:  # the bare loop right after, in the same process (sequential, so only a rough comparison)
        from qflux.adapters.lora_files import attach_lora
        from qflux.run.cache import open_cache

        cache, _ = open_cache(config, registry, Console(quiet=True))
        transformer = so.bench_transformer().train()
        bare = so.BareStep(transformer, attach_lora(transformer, config.model.lora), cache.get(cache.keys()[0]),
                           config.train.lr)
        times = []
        for _ in range(len(intervals) + 3):
            t0 = time.perf_counter()
            bare()
            times.append(time.perf_counter() - t0)
        out["bare_steps_per_s"] = 1 / statistics.median(times[3:])
    print(json.dumps(out))


def run_child(tmp: Path, cached: bool, steps: int, threads: int) -> dict:
    """Run ``child`` in a fresh interpreter. Started through ``sh`` (which forks it; ``; exit`` keeps sh from
    exec-ing it in place): on Linux a process started by fork + exec from this big process would inherit this
    process's peak in ``ru_maxrss`` (the kernel keeps the old image's high-water mark across exec)."""
    cmd = [sys.executable, __file__, "--child", "cached" if cached else "uncached", "--tmp", str(tmp),
           "--steps", str(steps), "--threads", str(threads)]
    launcher = ["sh", "-c", '"$@"; exit $?', "sh", *cmd]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- start-up with many entries


def startup(root: Path, entries: int, registry, hook, trainer, encoders, tmp: Path) -> dict:
    """Fill ``root`` with ``entries`` small real entries, then time opening it (index + membership of every
    key) and opening + reading every entry; medians of 3 fresh opens each."""
    from qflux.cache import EmbeddingCache
    from qflux.data import open_records

    small = so.load_bench_config(tmp / "small", cache=True, num_samples=8, resolution=32)
    samples = [so.encode_one(r, small, hook, trainer, encoders) for r in open_records(small.data)]
    cache = EmbeddingCache(root)
    keys = [hashlib.sha256(f"bench:{i}".encode()).hexdigest()[:40] for i in range(entries)]
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        cache.put(key, samples[i % len(samples)])
    put_s = time.perf_counter() - t0
    open_member, open_read = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        c = EmbeddingCache(root)
        assert all(k in c for k in keys)
        open_member.append(time.perf_counter() - t0)
    for _ in range(3):
        t0 = time.perf_counter()
        c = EmbeddingCache(root)
        assert all(c.get(k) is not None for k in keys)
        open_read.append(time.perf_counter() - t0)
    entry_bytes = sum(c.path_of(k).stat().st_size for k in keys[:100]) / 100
    return {"put_per_s": entries / put_s, "open_member_s": statistics.median(open_member),
            "open_read_s": statistics.median(open_read), "entry_kib": entry_bytes / 1024}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of cached / uncached / bare")
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--samples", type=int, default=12, help="builtin:shapes samples in the dataset")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each real train() run")
    parser.add_argument("--entries", type=int, default=10_000, help="entries for the start-up measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see step_overhead.py); 0: default")
    parser.add_argument("--child", choices=["cached", "uncached"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.tmp, args.child == "cached", args.steps, args.threads)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console

    from qflux.cache import entry_key
    from qflux.data import open_records
    from qflux.run.cache import build_cache, open_cache
    from qflux.testing import spied_registry

    tmp = Path(tempfile.mkdtemp(prefix="qflux-cache-bench-"))
    config = so.load_bench_config(tmp, cache=True, num_samples=args.samples, max_steps=args.steps)
    plugin = TimedBenchPlugin()
    registry = spied_registry(plugin, trainer="kontext")
    hook, trainer = registry.hook, registry.trainer(config.trainer)
    quiet = Console(stderr=True, quiet=True)

    # ---- cache build
    report = build_cache(config, registry, quiet)
    encode_s = report.seconds - plugin.encoder_load_s
    cache, context = open_cache(config, registry, quiet)
    records = open_records(config.data)
    keys = [entry_key(context, r.fingerprint()) for r in records]
    assert all(k in cache for k in keys), "the cache is not complete after build_cache"
    print(f"setup: {len(records)} builtin:shapes samples at {so.RESOLUTION}px; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    # ---- one cached read (256 px entries)
    for k in keys:
        cache.get(k)  # warm the page cache: steady state of a run
    reads = []
    for _ in range(20):
        for k in keys:
            t0 = time.perf_counter()
            cache.get(k)
            reads.append(time.perf_counter() - t0)
    read_ms = statistics.mean(reads) * 1e3
    entry_kib = cache.path_of(keys[0]).stat().st_size / 1024

    # ---- steps/s: cached / uncached / bare, interleaved
    encoders = trainer.load_encoders(config.model)
    samples = [cache.get(k) for k in keys]
    qflux = so.QfluxStep(config, registry)
    bare = so.BareStep(qflux.module, qflux.params, samples[0], config.train.lr)
    n = len(keys)
    variants = {
        "cached": lambda i: qflux([cache.get(keys[i % n])]),
        "uncached": lambda i: qflux([so.encode_one(records[i % n], config, hook, trainer, encoders)]),
        "bare": lambda i: bare(),
    }
    wall = {name: [] for name in variants}
    names = list(variants)
    for name in names:
        for i in range(3):
            variants[name](i)
    counter = 0
    for r in range(args.rounds):
        order = names[r % 3:] + names[: r % 3]
        for name in order:
            row = []
            for _ in range(args.per_round):
                t0 = time.perf_counter()
                variants[name](counter)
                row.append(time.perf_counter() - t0)
                counter += 1
            wall[name].append(row)
    rate = {name: 1e3 / so.median_ms(rows) for name, rows in wall.items()}
    cached_vs_bare, c_q1, c_q3 = so.paired_ratio(wall["bare"], wall["cached"])  # time ratio = rate ratio
    uncached_vs_bare, _, _ = so.paired_ratio(wall["bare"], wall["uncached"])

    # ---- start-up with many entries
    big = startup(tmp / "cache-10k", args.entries, registry, hook, trainer, encoders, tmp)

    # ---- real runs in subprocesses (the cache of this config is complete)
    cached_run = run_child(tmp, True, args.steps, args.threads)
    uncached_run = run_child(tmp, False, args.steps, args.threads)
    from qflux_kontext.tiny import tiny_text_encoders, tiny_vae

    tiny = tiny_text_encoders()
    enc_mib = sum(p.numel() * p.element_size() for m in (tiny_vae(), tiny["text_encoder"], tiny["text_encoder_2"])
                  for p in m.parameters()) / 2**20

    def ok(flag: bool) -> str:
        return "met" if flag else "NOT met"

    print()
    print(f"{'measure':64s} {'value':>12s}  target")
    print(f"{'cache build (incl. loading the encoders ' + format(plugin.encoder_load_s, '.1f') + ' s), samples/s':64s} "
          f"{report.encoded / report.seconds:12.2f}")
    print(f"{'cache build, encoding only, samples/s':64s} {report.encoded / encode_s:12.2f}")
    print(f"{'steps/s cached (cache.get + step body, per step)':64s} {rate['cached']:12.2f}")
    print(f"{'steps/s uncached (load_sample + Trainer.encode + step body)':64s} {rate['uncached']:12.2f}")
    print(f"{'steps/s bare loop (limit)':64s} {rate['bare']:12.2f}")
    print(f"{'cached / bare (median over rounds; quartiles ' + format(c_q1, '.3f') + '-' + format(c_q3, '.3f') + ')':64s}"
          f" {cached_vs_bare:12.3f}  >= {TARGET_CACHED} {ok(cached_vs_bare >= TARGET_CACHED)}")
    print(f"{'uncached / bare (median over rounds)':64s} {uncached_vs_bare:12.3f}")
    print(f"{'cached / uncached (ratio of median rates)':64s} {rate['cached'] / rate['uncached']:12.2f}x")
    print(f"{'train(), cache complete: steps/s (metrics.jsonl, median interval)':64s} "
          f"{cached_run['steps_per_s']:12.2f}")
    print(f"{'  bare loop right after, same process: steps/s':64s} {cached_run['bare_steps_per_s']:12.2f}"
          f"  (train()/bare {cached_run['steps_per_s'] / cached_run['bare_steps_per_s']:.3f}, sequential)")
    print(f"{'train(), cache.enabled false (encodes all at start-up): steps/s':64s} {uncached_run['steps_per_s']:12.2f}")
    for label, run in (("cache complete", cached_run), ("cache off", uncached_run)):
        print(f"{'train(), ' + label + ': peak RSS MiB, getrusage (after imports ' + format(run['rss_after_imports_mib'], '.0f') + ')':64s}"
              f" {run['peak_rss_mib']:12.0f}  (VmHWM {run['vm_hwm_mib']:.0f})")
    for label, run in (("cache complete", cached_run), ("cache off", uncached_run)):
        print(f"{'train(), ' + label + ': Trainer.load_encoders calls':64s} {run['encoder_loads']:12d}"
              + (f"  0 {ok(run['encoder_loads'] == 0)}" if run is cached_run else ""))
    print(f"{'  (builtin:tiny encoder weights, float32, MiB)':64s} {enc_mib:12.1f}")
    print(f"{'one cached read, mean ms (256 px entry, ' + format(entry_kib, '.0f') + ' KiB)':64s} {read_ms:12.3f}"
          f"  <= {TARGET_READ_MS} {ok(read_ms <= TARGET_READ_MS)}")
    print(f"{'writing ' + str(args.entries) + ' entries (' + format(big['entry_kib'], '.0f') + ' KiB each), puts/s':64s}"
          f" {big['put_per_s']:12.0f}")
    print(f"{'start-up, ' + str(args.entries) + ' entries: open + membership of every key, s':64s} "
          f"{big['open_member_s']:12.3f}  <= {TARGET_STARTUP_S} {ok(big['open_member_s'] <= TARGET_STARTUP_S)}")
    print(f"{'start-up, ' + str(args.entries) + ' entries: open + get() of every entry, s':64s} "
          f"{big['open_read_s']:12.3f}")
    print(f"\nsteps/s: {args.rounds} rounds x {args.per_round} steps per variant, rotating order; train() runs: "
          f"{args.steps} steps each, one subprocess each; start-up: median of 3 opens (warm page cache)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
