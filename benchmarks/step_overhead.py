"""Overhead of qflux's training step over a bare PyTorch loop (issue 3 item 11).

One run, one process, on a small Kontext-shaped ``FluxTransformer2DModel`` (about 9.4 M parameters: the
``builtin:tiny`` config widened to 4 heads x 64, 2 double + 4 single blocks), LoRA r16 on the default targets,
batch 1, a 256x256 target plus one 256x256 control (256 + 256 image tokens, 32 T5 tokens), float32 on CPU:

(a) data + encoding, per sample: ``load_sample`` (decode, resize) + ``Trainer.encode`` through the kontext hooks
    with the ``builtin:tiny`` encoders (CLIP + T5 + VAE). A cached run pays this once per sample, not per step.
(b) qflux's transformer part: the body of ``qflux.run.train.train`` per optimizer step, line for line:
    per-sample generators -> caption dropout -> ``collate`` -> ``Batch.to`` -> ``accelerator.accumulate`` /
    ``autocast`` -> ``training_loss`` (sigma and noise, ``Trainer.predict`` and ``qflux_loss`` hooks) ->
    ``float(loss)`` + finiteness check -> ``accelerator.backward`` -> ``accelerator.clip_grad_norm_`` ->
    ``optimizer.step`` -> ``zero_grad`` -> ``lr_scheduler.step``; LoRA from ``qflux.adapters.lora_files.attach_lora``, optimizer and scheduler from
    ``qflux.training.optim``, transformer and optimizer through ``accelerator.prepare`` as the loop does.
(c) a bare loop on the same transformer object (same LoRA parameters, its own ``torch.optim.AdamW``) and the
    same prepared tensors: precomputed noisy input, target, ids, timestep and guidance; forward, MSE on the
    target tokens, backward, AdamW step, zero_grad. This is the limit.

(b) and (c) are timed interleaved in rounds (order alternating each round) so that load from other processes
on a shared machine hits both alike; the headline ratio is the median over rounds of the per-round ratio of
medians. Target: (b)/(c) <= 1.10.

    .venv/bin/python benchmarks/step_overhead.py [--rounds 40] [--per-round 2] [--threads 1] [--profile]

It also times, alone, each piece of work (b) does that (c) does not; ``--profile`` adds a cProfile of (b).
This module is also imported by ``cache_speedup.py`` for the shared model, config and step definitions.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESOLUTION = 256  # target and control side in pixels: (256 / 16)^2 = 256 tokens each
TARGET_RATIO = 1.10


def bench_transformer_config() -> dict[str, Any]:
    """``builtin:tiny``'s transformer config widened to ~9.4 M parameters (encoder widths unchanged)."""
    from qflux_kontext.tiny import TRANSFORMER_CONFIG

    return dict(TRANSFORMER_CONFIG, num_attention_heads=4, attention_head_dim=64, num_layers=2,
                num_single_layers=4, axes_dims_rope=(16, 24, 24))


def bench_transformer() -> torch.nn.Module:
    """The widened transformer, deterministic (seed 1, global RNG untouched), frozen, eval, float32."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = FluxTransformer2DModel(**bench_transformer_config())
    return model.eval().requires_grad_(False)


class BenchPlugin:
    """A spy on the kontext trainer (``qflux.testing.spied_registry``): hands the loop the widened transformer
    instead of the ``builtin:tiny`` one and counts ``Trainer.load_encoders`` calls (it loads nothing itself)."""

    def __init__(self) -> None:
        self.encoder_loads = 0

    def load_transformer(self, inner, model):
        return bench_transformer().to(getattr(torch, model.dtype))

    def load_encoders(self, inner, model):
        self.encoder_loads += 1
        return inner(model)


def bench_config_dict(tmp: Path, *, cache: bool, num_samples: int = 8, max_steps: int = 1000,
                      resolution: int = RESOLUTION) -> dict[str, Any]:
    """A config for the benchmark: builtin:tiny encoders + builtin:shapes at 256 px, LoRA r16 (default
    targets), batch 1, adamw lr 1e-4, constant schedule, logit_normal, clipping 1.0, float32, no validation."""
    from qflux.testing import tiny_config

    return tiny_config(
        tmp,
        model={"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 16, "alpha": 16}},
        data={"path": "builtin:shapes", "resolution": resolution, "num_samples": num_samples, "holdout": 0,
              "control_resolution": "target"},
        cache={"enabled": cache, "dir": str(tmp / "cache")},
        train={"max_steps": max_steps, "batch_size": 1, "lr": 1e-4, "optimizer": "adamw", "scheduler": "constant",
               "timestep_sampling": "logit_normal", "max_grad_norm": 1.0, "save_every": 0, "seed": 0},
        validation={"every": 0},
        output={"dir": str(tmp / "run")},
    )


def load_bench_config(tmp: Path, **kwargs: Any):
    from qflux.config import load_config
    from qflux.testing import write_config

    tmp.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp / "bench.yaml", bench_config_dict(tmp, **kwargs)))


# --------------------------------------------------------------------------- the compared steps


class QfluxStep:
    """The training loop's per-step body (``qflux.run.train.train``: the same ``micro_step``), on its own
    prepared objects."""

    def __init__(self, config, registry) -> None:
        from accelerate import Accelerator

        from qflux.adapters.lora_files import attach_lora
        from qflux.training.optim import build_lr_scheduler, build_optimizer

        self.config, self.hook = config, registry.hook
        self.trainer = registry.trainer(config.trainer)
        self.accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                                       gradient_accumulation_steps=config.train.grad_accum)
        transformer = self.trainer.load_transformer(config.model)
        self.params = attach_lora(transformer, config.model.lora)
        optimizer = build_optimizer(self.params, config.train)
        self.lr_scheduler = build_lr_scheduler(optimizer, config.train)
        self.transformer, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        self.transformer.train()
        self.dtype = getattr(torch, config.model.dtype)

    @property
    def module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.transformer)

    def __call__(self, samples: list, epoch: int = 0) -> float:
        from qflux.training.step import make_batch, micro_step

        accelerator, config = self.accelerator, self.config
        batch, generators = make_batch(samples, config, epoch, accelerator.device, self.dtype)
        value = micro_step(accelerator, self.hook, self.trainer, self.transformer, batch, config, generators,
                           self.params, self.optimizer)
        if not math.isfinite(value):
            raise RuntimeError("non-finite loss")
        if accelerator.sync_gradients:
            self.lr_scheduler.step()
            self.lr_scheduler.get_last_lr()
        return value


class BareStep:
    """Forward, MSE, backward, AdamW on prepared tensors; the same module and LoRA parameters as ``qflux``."""

    def __init__(self, transformer: torch.nn.Module, params: list[torch.nn.Parameter], sample, lr: float) -> None:
        from qflux_kontext.packing import kontext_image_ids, text_ids

        self.transformer = transformer
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        g = torch.Generator().manual_seed(0)
        x0 = sample.latents[None].float()
        noise = torch.randn(x0.shape, generator=g)
        sigma = 0.5
        self.n = x0.shape[1]
        self.hidden = torch.cat([(1 - sigma) * x0 + sigma * noise, *[c[None].float() for c in sample.controls]], 1)
        self.target = noise - x0
        self.timestep = torch.full([1], sigma)
        self.guidance = torch.full([1], 1.0)
        self.prompt = sample.prompt.hidden[None].float()
        self.pooled = sample.prompt.pooled[None].float()
        self.txt_ids = text_ids(self.prompt.shape[1])
        self.img_ids = kontext_image_ids(sample.grid, list(sample.control_grids))

    def __call__(self, samples: list | None = None) -> float:
        out = self.transformer(hidden_states=self.hidden, timestep=self.timestep, guidance=self.guidance,
                               pooled_projections=self.pooled, encoder_hidden_states=self.prompt,
                               txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out[:, : self.n], self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# --------------------------------------------------------------------------- timing helpers


def interleaved(variants: dict[str, Callable[[int], Any]], rounds: int, per_round: int,
                warmup: int = 3) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """Per variant, per round, the wall seconds and the CPU seconds (``time.process_time``) of each call.
    Rounds alternate the variant order (A B, B A, A B ...)."""
    names = list(variants)
    for name in names:
        for i in range(warmup):
            variants[name](i)
    wall: dict[str, list[list[float]]] = {name: [] for name in names}
    cpu: dict[str, list[list[float]]] = {name: [] for name in names}
    counter = 0
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            row_wall, row_cpu = [], []
            for _ in range(per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                variants[name](counter)
                row_wall.append(time.perf_counter() - t0)
                row_cpu.append(time.process_time() - c0)
                counter += 1
            wall[name].append(row_wall)
            cpu[name].append(row_cpu)
    return wall, cpu


def flat(rows: list[list[float]]) -> list[float]:
    return [t for row in rows for t in row]


def median_ms(rows: list[list[float]]) -> float:
    return statistics.median(flat(rows)) * 1e3


def paired_ratio(num: list[list[float]], den: list[list[float]]) -> tuple[float, float, float]:
    """Median, first and third quartile over rounds of ``median(num round) / median(den round)``."""
    ratios = sorted(statistics.median(a) / statistics.median(b) for a, b in zip(num, den, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def _median_us(fn: Callable[[], Any], reps: int, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def extras_breakdown(q: QfluxStep, bare: BareStep, sample, reps: int = 200) -> list[tuple[str, float, float]]:
    """What (b) does besides the transformer forward/backward and AdamW, each piece timed alone (median of
    ``reps`` calls, microseconds), next to what (c) spends on the same job: ``(piece, qflux us, bare us)``."""
    from qflux.loss import flow_matching_loss
    from qflux.training.batching import collate
    from qflux.training.step import apply_caption_dropout, sample_generator
    from qflux.training.timesteps import add_noise, sample_sigmas
    from qflux_kontext.packing import kontext_image_ids, text_ids
    from qflux_kontext.predict import transformer_config

    cfg, acc = q.config, q.accelerator
    batch = collate([sample]).to(acc.device, q.dtype)
    latents = batch.latents
    noisy = add_noise(latents, torch.full([1], 0.5), torch.randn_like(latents))
    pred = torch.randn_like(latents).requires_grad_(True)
    target = noisy.target

    def set_grads() -> None:
        for p in q.params:
            p.grad = torch.full_like(p, 1e-3)

    def context() -> None:
        with acc.accumulate(q.transformer), acc.autocast():
            pass

    def glue() -> None:
        transformer_config(q.transformer)
        torch.full([latents.shape[0]], q.trainer.options(cfg.model).guidance, dtype=torch.float32)  # model.options
        torch.cat([noisy.latents, *[c.to(dtype=latents.dtype) for c in batch.controls]], dim=1)
        text_ids(batch.prompt.hidden.shape[1])
        kontext_image_ids(batch.grid, list(batch.control_grids))

    def qflux_loss() -> None:
        q.hook.qflux_loss(prediction=pred, noisy=noisy, batch=batch, loss=cfg.loss).backward()

    def direct_loss() -> None:
        w = cfg.loss.mask_weighting
        flow_matching_loss(pred, target, batch.mask, w.foreground, w.background).backward()

    def mse() -> None:
        torch.nn.functional.mse_loss(pred, target).backward()

    loss, gen = torch.tensor(0.25), torch.Generator().manual_seed(0)
    rows = [
        ("per-sample generator (sha256 + manual_seed)",
         _median_us(lambda: sample_generator(cfg.train.seed, 0, sample.key), reps), 0.0),
        ("caption dropout + collate + Batch.to",
         _median_us(lambda: collate(apply_caption_dropout([sample], cfg.data.caption_dropout, [gen])).to(
             acc.device, q.dtype), reps), 0.0),
        ("sigma sampling + noise + add_noise",
         _median_us(lambda: add_noise(latents, torch.cat([sample_sigmas(1, latents.shape[1], cfg.train, gen)]),
                                      torch.stack([torch.randn(latents.shape[1:], generator=gen)])), reps), 0.0),
        ("predict glue: config lookup, options + guidance, cat, txt/img ids", _median_us(glue, reps), 0.0),
        ("loss fwd+bwd via qflux_loss hook (bare: F.mse_loss)", _median_us(qflux_loss, reps), _median_us(mse, reps)),
        ("  of which pluggy dispatch (hook - direct call)",
         _median_us(qflux_loss, reps) - _median_us(direct_loss, reps), 0.0),
        ("float(loss) + math.isfinite", _median_us(lambda: math.isfinite(float(loss.detach())), reps),
         _median_us(lambda: float(loss.detach()), reps)),
        ("accelerator.accumulate + autocast contexts", _median_us(context, reps), 0.0),
        ("accelerator.clip_grad_norm_ (LoRA grads)",
         _median_us(lambda: acc.clip_grad_norm_(q.params, cfg.train.max_grad_norm), reps, set_grads), 0.0),
        ("optimizer.step (AcceleratedOptimizer(AdamW) vs AdamW)",
         _median_us(q.optimizer.step, reps // 4, set_grads), _median_us(bare.optimizer.step, reps // 4, set_grads)),
        ("optimizer.zero_grad", _median_us(lambda: q.optimizer.zero_grad(set_to_none=True), reps, set_grads),
         _median_us(lambda: bare.optimizer.zero_grad(set_to_none=True), reps, set_grads)),
        ("lr_scheduler.step + get_last_lr",
         _median_us(lambda: (q.lr_scheduler.step(), q.lr_scheduler.get_last_lr()), reps), 0.0),
    ]
    for p in q.params:
        p.grad = None
    return rows


def encode_one(record, config, hook, trainer, encoders):
    from qflux.data import load_sample

    sample = load_sample(record, config.data)
    return trainer.encode(encoders, [sample], config.model, config.data.caption_dropout > 0)[0]


def python_profile(fn: Callable[[], Any], steps: int, top: int = 25) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds of (b) and (c)")
    parser.add_argument("--per-round", type=int, default=2, help="steps of each variant per round")
    parser.add_argument("--samples", type=int, default=8, help="builtin:shapes samples (encoded for (a))")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a 2-thread step waits on the slower "
                             "thread and the ratio drowns in noise; 0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of (b)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from qflux.data import open_records

    tmp = Path(tempfile.mkdtemp(prefix="qflux-bench-"))
    config = load_bench_config(tmp, cache=False, num_samples=args.samples)
    from qflux.testing import spied_registry

    registry = spied_registry(BenchPlugin(), trainer="kontext")
    hook, trainer = registry.hook, registry.trainer(config.trainer)

    # (a) data + encoding
    records = open_records(config.data)
    t0 = time.perf_counter()
    encoders = trainer.load_encoders(config.model)
    encoders_load_s = time.perf_counter() - t0
    encode_one(records[0], config, hook, trainer, encoders)  # warm-up
    encode_times, samples = [], []
    for _ in range(2):
        for record in records:
            t0 = time.perf_counter()
            sample = encode_one(record, config, hook, trainer, encoders)
            encode_times.append(time.perf_counter() - t0)
            samples.append(sample)
    samples = samples[: len(records)]

    # (b) qflux step and (c) bare loop on the same module and LoRA parameters
    qflux = QfluxStep(config, registry)
    bare = BareStep(qflux.module, qflux.params, samples[0], config.train.lr)
    s = samples[0]
    n_params = sum(p.numel() for p in qflux.module.parameters())
    n_lora = sum(p.numel() for p in qflux.params)
    n_target, n_control = s.latents.shape[0], sum(c.shape[0] for c in s.controls)
    print(f"model: FluxTransformer2DModel {n_params / 1e6:.2f} M params, LoRA r16 on {list(config.model.lora.targets)}"
          f" ({n_lora:,} trainable); batch 1, {n_target} target + {n_control} control tokens, "
          f"{s.prompt.hidden.shape[0]} text tokens; float32 CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    wall, cpu = interleaved({"qflux": lambda i: qflux([samples[i % len(samples)]]), "bare": lambda i: bare()},
                            rounds=args.rounds, per_round=args.per_round)
    b_ms, c_ms = median_ms(wall["qflux"]), median_ms(wall["bare"])
    ratio, q1, q3 = paired_ratio(wall["qflux"], wall["bare"])
    cpu_ratio, cq1, cq3 = paired_ratio(cpu["qflux"], cpu["bare"])
    a_ms = statistics.median(encode_times) * 1e3

    print()
    print(f"{'part':60s} {'median ms':>10s} {'per s':>7s}")
    print(f"{'(a) data + encoding per sample (load_sample + Trainer.encode)':60s} {a_ms:10.1f} {1e3 / a_ms:7.2f}")
    print(f"{'(b) qflux transformer part (the loop body per step)':60s} {b_ms:10.1f} {1e3 / b_ms:7.2f}")
    print(f"{'(c) bare loop (forward, MSE, backward, AdamW)':60s} {c_ms:10.1f} {1e3 / c_ms:7.2f}")
    print(f"{'(a) + (b): a step that encodes inline (no cache)':60s} {a_ms + b_ms:10.1f} {1e3 / (a_ms + b_ms):7.2f}")
    print()
    print(f"(a): {len(encode_times)} encodes after a warm-up (builtin:tiny encoders loaded once, {encoders_load_s:.2f} s);"
          f" (b), (c): {args.rounds} interleaved rounds x {args.per_round} steps each, after 3 warm-up steps")
    print(f"RATIO (b)/(c) = {ratio:.3f}  (wall time, median over rounds of the per-round ratio; quartiles "
          f"{q1:.3f}-{q3:.3f}); ratio of overall medians {b_ms / c_ms:.3f}; CPU-time ratio {cpu_ratio:.3f} "
          f"({cq1:.3f}-{cq3:.3f})")
    print(f"target <= {TARGET_RATIO:.2f}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}")

    rows = extras_breakdown(qflux, bare, samples[0])
    print("\nwhat (b) does besides forward/backward/AdamW, each piece timed alone (median of 200 calls):")
    print(f"{'piece':60s} {'qflux us':>9s} {'bare us':>9s} {'extra us':>9s}")
    extra = 0.0
    for name, qus, bus in rows:
        print(f"{name:60s} {qus:9.1f} {bus:9.1f} {qus - bus:9.1f}")
        if not name.startswith(" "):
            extra += qus - bus
    print(f"{'total extra per step':60s} {'':9s} {'':9s} {extra:9.1f}  = {extra / 10 / c_ms:.2f}% of (c)")

    if args.profile:
        print("\ncProfile of 10 steps of (b), by own time:")
        print(python_profile(lambda: qflux([samples[0]]), 10))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
