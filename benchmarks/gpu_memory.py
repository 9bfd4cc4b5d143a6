"""Peak GPU memory and seconds per step of LoRA training on the full-size models, MEASURED on one GPU, next to
``qflux plan``'s prediction (issue 19).

    .venv/bin/python benchmarks/gpu_memory.py [--models kontext,qwen] [--variants bf16,nf4,nf4+ckpt,nf4+offload]
                                              [--steps 4] [--resolution 1024] [--offload-blocks all]

    .venv/bin/python benchmarks/gpu_memory.py --smoke     # no GPU: tiny widths on CPU, checks the script runs
    .venv/bin/python benchmarks/gpu_memory.py --plan-only # no GPU: the full-size predictions alone

What it runs: the FLUX.1 Kontext-dev and Qwen-Image-Edit-2509 transformers at full size, random-init from the
diffusers class defaults (nothing is downloaded): ``FluxTransformer2DModel(guidance_embeds=True)`` (19 double +
38 single blocks, 11.9 B parameters; trainer ``kontext``) and ``QwenImageTransformer2DModel()`` (60 blocks,
20.4 B; trainer ``qwen-edit-plus``). The weights are made directly on the GPU in bfloat16 (never on the CPU).
Each model is trained at 1024 x 1024 with one 1024 x 1024 reference (4096 target + 4096 reference tokens; the
prompt at its real width: T5 4096 x 512 tokens + CLIP pooled 768 for Kontext, Qwen2.5-VL 3584 x 300 tokens for
Qwen), batch 1, LoRA r16 (alpha 16) on the default targets, AdamW, no autocast (``train.mixed_precision: no``,
the base in ``model.dtype: bfloat16``), in the variants

- ``bf16``: the bfloat16 base;
- ``nf4``: the base quantized by qflux-quant's nf4 (``registry.quantizer("nf4").quantize``);
- ``nf4+ckpt``: and ``model.gradient_checkpointing``;
- ``nf4+offload``: and ``model.offload_blocks`` (``--offload-blocks``, default every repeated block);
  ``+ckpt`` and ``+offload`` combine (``nf4+ckpt+offload``), and ``fp8`` / ``int8`` / ``fp4`` replace ``nf4``.

The run's own components build and step the model: ``qflux.run.models.training_models`` (quantize, then
gradient checkpointing, then the adapter, then the offloader, in a run's order) on the random-init transformer,
``qflux.training.step.predict`` (the trainer's ``Trainer.predict``) on a ``qflux.types.Batch`` of random tensors
of the shapes the embedding cache would hold, sized by the same rule ``qflux plan`` uses, ``add_noise``, MSE on
the velocity target, backward, ``qflux.training.optim.build_optimizer`` (AdamW) step. Each variant runs in its
own process (so peaks do not mix); after the model is built ``torch.cuda.reset_peak_memory_stats()``, then
``--steps`` steps; "measured" is ``torch.cuda.max_memory_allocated()`` over the steps, "s/step" the median of
steps 2..N (the first is warm-up). "predicted" is ``qflux plan``'s train-phase accelerator total
(``plan_memory(config, registry, transformer=<the same class on the meta device>, accelerator=True,
references=1).phase_total("train", "accelerator")``), computed in the parent process without a GPU. After the
table: per variant the plan's train-phase parts, and the measured bytes held right after building (weights +
adapter) next to the plan's weights part.

Needs ONE LARGE GPU: bf16 Qwen holds 20.4 B x 2 bytes = 41 GB of weights plus ~40 GB of activations without
checkpointing at 1024 px, so ~80 GB+ (an H100 80 GB may run out of memory on that one variant: it is then
reported as OOM and the others still run); the whole default set takes < 10 minutes on an H200. The figures go
into ``benchmarks/README.md`` (with the GPU named), written by the lead.

``--smoke`` runs the same code path on the CPU with the same classes at reduced depth and width (Kontext 1 double
+ 2 single blocks, Qwen 2 blocks, 2 heads each; the real input, prompt and pooled widths) at 256 x 256, in
float32 (``model.dtype: float32``: bfloat16 matmuls on a CPU are ~10x slower; the GPU run is bfloat16): the
measured column is "n/a" (no device memory to read), the prediction is still printed. It exists so that a
broken script is found before GPU time is spent (a few minutes on 2 busy cores); a quantizer that cannot run
on the CPU is skipped with its reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]
RESULT = "GPU_MEMORY_RESULT "  # the child's last line: this prefix + JSON
QUANTIZERS = ("nf4", "fp4", "int8", "fp8")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    trainer: str
    cls: str  # diffusers class name
    full: dict[str, Any]  # the class defaults of the real model (kwargs)
    smoke: dict[str, Any]  # --smoke: reduced depth and width, the same input / prompt widths


MODELS: dict[str, ModelSpec] = {
    "kontext": ModelSpec("kontext", "FLUX.1-Kontext-dev", "kontext", "FluxTransformer2DModel",
                         dict(guidance_embeds=True),
                         dict(guidance_embeds=True, num_layers=1, num_single_layers=2, num_attention_heads=2)),
    "qwen": ModelSpec("qwen", "Qwen-Image-Edit-2509", "qwen-edit-plus", "QwenImageTransformer2DModel",
                      {}, dict(num_layers=2, num_attention_heads=2)),
}


@dataclass(frozen=True)
class Variant:
    name: str
    quantize: str | None
    checkpointing: bool
    offload: bool


def parse_variant(text: str) -> Variant:
    base, *mods = text.strip().split("+")
    if base != "bf16" and base not in QUANTIZERS:
        raise SystemExit(f"variant {text!r}: starts with bf16 or a quantizer ({', '.join(QUANTIZERS)})")
    unknown = set(mods) - {"ckpt", "offload"}
    if unknown:
        raise SystemExit(f"variant {text!r}: unknown modifier(s) {sorted(unknown)} (known: ckpt, offload)")
    return Variant(text.strip(), None if base == "bf16" else base, "ckpt" in mods, "offload" in mods)


# --------------------------------------------------------------------------- config and models


def make_config(spec: ModelSpec, variant: Variant, resolution: int, offload_blocks: int, rank: int,
                smoke: bool = False) -> Any:
    """The run's ``QfluxConfig``: a yaml written to a temp dir and read by ``qflux.config.load_config``."""
    import yaml

    from qflux.config import load_config

    data = {
        "trainer": spec.trainer,
        "model": {"dtype": "float32" if smoke else "bfloat16", "quantize": variant.quantize,
                  "gradient_checkpointing": variant.checkpointing,
                  "offload_blocks": offload_blocks if variant.offload else 0,
                  "lora": {"rank": rank, "alpha": rank}},
        "data": {"resolution": resolution},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path)


def model_kwargs(spec: ModelSpec, smoke: bool) -> dict[str, Any]:
    return dict(spec.smoke if smoke else spec.full)


def build_transformer(spec: ModelSpec, smoke: bool, device: Any, dtype: Any = None) -> Any:
    """The diffusers class on ``device`` ("meta" for planning), parameters made directly in ``dtype`` (the
    default dtype is switched while the class builds, so a 20 B model never exists in float32 or on the CPU)."""
    import diffusers
    import torch

    cls = getattr(diffusers, spec.cls)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**model_kwargs(spec, smoke))
    finally:
        torch.set_default_dtype(previous)
    if dtype is not None:
        torch.nn.Module.to(model, dtype)  # anything the class made in float32 explicitly (none in 0.42)
    return model


def shapes(config: Any, trainer: Any) -> dict[str, Any]:
    """Token grids of the target and the one reference, and the prompt length, by the rule ``qflux plan`` uses
    (``qflux.plan.estimate.plan_tokens``: the data stage's target size and the trainer's condition sizing)."""
    from qflux.data.resize import default_size, plan_control, plan_target
    from qflux.plan.estimate import plan_tokens

    data = config.data
    w, h = default_size(data)
    target = plan_target(w, h, data)
    control = plan_control(w, h, data, target, trainer.info.condition_sizing).size
    tokens, _, _ = plan_tokens(config, trainer, 1)
    grid = (target.size[1] // 16, target.size[0] // 16)
    control_grid = (control[1] // 16, control[0] // 16)
    assert grid[0] * grid[1] == tokens.target and control_grid[0] * control_grid[1] == tokens.references, (
        "this script sizes the tokens differently from qflux.plan.estimate.plan_tokens")
    return {"grid": grid, "control_grid": control_grid, "text": tokens.text, "total": tokens.total}


# --------------------------------------------------------------------------- prediction (parent, no GPU)


def predict(spec: ModelSpec, variant: Variant, args: argparse.Namespace, offload_blocks: int,
            meta: Any, registry: Any) -> dict[str, Any]:
    from qflux.plan import plan_memory

    config = make_config(spec, variant, args.resolution, offload_blocks, args.rank, args.smoke)
    plan = plan_memory(config, registry, transformer=meta, accelerator=True, references=1)
    phase, peak = plan.peak("accelerator")
    parts = [(p.name, p.bytes) for p in plan.parts if p.phase == "train" and p.where == "accelerator"]
    weights = next((b for n, b in parts if n.startswith("transformer weights")), None)
    return {"train": plan.phase_total("train", "accelerator"), "peak_phase": phase, "peak": peak,
            "parts": parts, "weights": weights, "notes": list(plan.notes)}


# --------------------------------------------------------------------------- measurement (child)


class _Handover:
    """Stands in for the trainer in ``qflux.run.models.Selection``: its ``load_transformer`` hands over the
    random-init transformer, so ``training_models`` quantizes, checkpoints, attaches and offloads it exactly as a
    run does with a loaded one."""

    def __init__(self, trainer: Any, transformer: Any) -> None:
        self.trainer, self.transformer = trainer, transformer

    def load_transformer(self, model: Any) -> Any:
        transformer, self.transformer = self.transformer, None
        return transformer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)


def random_batch(transformer: Any, config: Any, trainer: Any, device: Any, dtype: Any) -> Any:
    """A one-sample ``Batch`` of the shapes the embedding cache would hold: packed latents [1, N, C], one
    reference [1, Nc, C], the prompt [1, L, D] at the transformer's prompt width (and CLIP's pooled [1, P] for
    FLUX), in ``model.dtype`` on the device (``make_batch``'s ``collate(...).to(device, dtype)``)."""
    import torch

    from qflux.types import Batch, PromptEmbeds

    cfg = transformer.config
    s = shapes(config, trainer)
    (gh, gw), (ch, cw) = s["grid"], s["control_grid"]
    channels = cfg.in_channels
    pooled_dim = getattr(cfg, "pooled_projection_dim", None)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    prompt = PromptEmbeds(hidden=randn(1, s["text"], cfg.joint_attention_dim),
                          mask=torch.ones(1, s["text"], dtype=torch.long, device=device),
                          pooled=randn(1, pooled_dim) if pooled_dim else None)
    if pooled_dim:  # FLUX's prompts carry no mask (T5 padded to max_sequence_length), as the kontext encoder's
        prompt.mask = None
    return Batch(keys=["bench"], latents=randn(1, gh * gw, channels), grid=(gh, gw), prompt=prompt,
                 controls=[randn(1, ch * cw, channels)], control_grids=[(ch, cw)])


def measure(spec: ModelSpec, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from qflux.plugins import build_registry
    from qflux.run.models import Selection, training_models
    from qflux.training.optim import build_optimizer
    from qflux.training.step import predict as step_predict
    from qflux.training.timesteps import add_noise

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.smoke else torch.bfloat16  # bf16 matmuls on a CPU: ~10x slower than float32
    config = make_config(spec, variant, args.resolution, args.offload_blocks_count, args.rank, args.smoke)
    registry = build_registry()
    trainer = registry.trainer(config.trainer)
    quantizer = registry.quantizer(variant.quantize) if variant.quantize else None
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)"}
    if cuda:
        out["device_total"] = torch.cuda.get_device_properties(device).total_memory

    torch.manual_seed(0)
    start = time.perf_counter()
    base = build_transformer(spec, args.smoke, device, dtype).eval().requires_grad_(False)
    out["params"] = sum(p.numel() for p in base.parameters())
    selection = Selection(_Handover(trainer, base), quantizer, registry.adapter(config.model.adapter))
    del base
    try:
        models = training_models(selection, config)
    except Exception as err:  # noqa: BLE001 - a quantizer without a CPU path: skipped in smoke mode only
        if not cuda and variant.quantize:
            return {**out, "skipped": f"{variant.quantize} on CPU failed: {type(err).__name__}: {err}"}
        raise
    transformer, params = models.transformer, models.params
    transformer.train()
    optimizer = build_optimizer(params, config.train)
    batch = random_batch(transformer, config, trainer, device, dtype)
    out["build_s"] = time.perf_counter() - start
    out["lora_params"] = sum(p.numel() for p in params)
    offloader = getattr(transformer, "_qflux_offloader", None)
    out["offloaded"] = offloader.report.describe() if offloader is not None else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        out["after_build"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    times: list[float] = []
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            sigmas = torch.rand(1, generator=generator).clamp(0.05, 0.95).to(device)
            noise = torch.randn(batch.latents.shape, generator=generator).to(device, dtype)
            noisy = add_noise(batch.latents, sigmas, noise)
            prediction = step_predict(trainer, transformer, batch, noisy, config.model)
            loss = F.mse_loss(prediction.float(), noisy.target.float())
            loss.backward()
            if not times:  # a backward that reaches no LoRA parameter would measure nothing real; at step 1 only
                # the lora_B tensors have a nonzero gradient (lora_B starts at 0, so lora_A's gradient is 0)
                out["lora_with_grad"] = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
                out["lora_tensors"] = len(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            out["loss"] = float(loss.detach())
    except torch.OutOfMemoryError as err:
        out["error"] = f"OOM after {len(times)} step(s): {str(err).splitlines()[0]}"
    if cuda:
        out["measured"] = torch.cuda.max_memory_allocated()
        out["reserved"] = torch.cuda.max_memory_reserved()
    out["times"] = times
    timed = times[1:] or times
    out["s_per_step"] = statistics.median(timed) if timed else None
    return out


def child_main(args: argparse.Namespace) -> int:
    spec, variant = MODELS[args.child_model], parse_variant(args.child_variant)
    try:
        result = measure(spec, variant, args)
    except Exception as err:  # noqa: BLE001 - reported in the table, the traceback on stderr
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
    print(RESULT + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def start_child(spec: ModelSpec, variant: Variant, args: argparse.Namespace, offload_blocks: int) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-model", spec.key, "--child-variant",
           variant.name, "--offload-blocks-count", str(offload_blocks), "--steps", str(args.steps),
           "--resolution", str(args.resolution), "--rank", str(args.rank), "--threads", str(args.threads)]
    if args.smoke:
        cmd.append("--smoke")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish_child(proc: Any, args: argparse.Namespace) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if not lines:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        return {"error": f"child exited {proc.returncode} without a result:\n{tail}"}
    result = json.loads(lines[-1][len(RESULT):])
    if "error" in result and args.verbose:
        sys.stderr.write(stderr[-4000:])
    return result


def gib(value: float | None, width: int = 9) -> str:
    return f"{'n/a':>{width}s}" if value is None else f"{value / GiB:{width}.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="kontext,qwen", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--variants", default="bf16,nf4,nf4+ckpt,nf4+offload",
                        help="comma-separated: bf16 | nf4 | fp4 | int8 | fp8, each with +ckpt and/or +offload")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant; the first is warm-up")
    parser.add_argument("--resolution", type=int, default=None, help="square side (default 1024; --smoke: 256)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--offload-blocks", default="all", help="blocks the +offload variants offload: N or all")
    parser.add_argument("--smoke", action="store_true", help="no GPU: reduced models on CPU at 256 px")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per variant's process")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in --smoke (0: torch's default)")
    parser.add_argument("--verbose", action="store_true", help="print a failed child's stderr")
    parser.add_argument("--plan-only", action="store_true", help="print the predictions, measure nothing (no GPU)")
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--offload-blocks-count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 256 if args.smoke else 1024
    if args.child_model:
        return child_main(args)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r} (known: {', '.join(MODELS)})")
    variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    if args.steps < 1:
        raise SystemExit("--steps: at least 1")

    from qflux.plugins import build_registry
    from qflux.training.offload import repeated_blocks

    registry = build_registry()
    started = time.perf_counter()
    rows: list[tuple[ModelSpec, Variant, dict[str, Any], dict[str, Any]]] = []
    device_name = None
    for key in models:
        spec = MODELS[key]
        meta = build_transformer(spec, args.smoke, "meta")
        blocks = len(repeated_blocks(meta))
        offload = blocks if args.offload_blocks == "all" else int(args.offload_blocks)
        for variant in variants:
            child = None if args.plan_only else start_child(spec, variant, args, offload)  # planned while it builds
            try:
                predicted = predict(spec, variant, args, offload, meta, registry)
            except Exception as err:  # noqa: BLE001 - the plan is being written: report, keep measuring
                predicted = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{time.perf_counter() - started:6.0f} s] {spec.label} {variant.name}: predicted "
                  f"{gib(predicted.get('train'), 0).strip()} GiB{'' if child is None else '; measuring ...'}",
                  flush=True)
            measured = finish_child(child, args) if child is not None else {"skipped": "--plan-only"}
            if measured.get("device") and device_name is None and not args.smoke:
                device_name = measured["device"]
            rows.append((spec, variant, predicted, measured))

    print()
    totals = [m.get("device_total") for _, _, _, m in rows if m.get("device_total")]
    if totals:
        device_name = f"{device_name} ({totals[0] / GiB:.1f} GiB)"
    print(f"GPU: {device_name or ('none (--smoke: CPU, reduced models)' if args.smoke else 'unknown')}; "
          f"{args.resolution} x {args.resolution}, 1 reference, LoRA r{args.rank}, batch 1, AdamW, "
          f"{args.steps} steps (s/step: median of steps 2..{args.steps}); +offload = "
          f"{args.offload_blocks} blocks; 1 GiB = 2^30 bytes")
    header = f"{'model':22s} {'variant':18s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s} {'s/step':>8s}  note"
    print(header)
    print("-" * len(header))
    for spec, variant, predicted, measured in rows:
        pred, meas = predicted.get("train"), measured.get("measured")
        ratio = f"{meas / pred:6.2f}" if pred and meas else f"{'n/a':>6s}"
        sps = measured.get("s_per_step")
        step = f"{sps:8.3f}" if sps is not None else f"{'n/a':>8s}"
        note = measured.get("skipped") or measured.get("error") or predicted.get("error") or ""
        if measured.get("lora_with_grad") == 0:
            note = f"NO LoRA GRADIENT (nothing trained) {note}"
        print(f"{spec.label:22s} {variant.name:18s} {gib(pred)} {gib(meas)} {ratio} {step}  {note}")
    print("(predicted: qflux plan's train-phase accelerator total; measured: torch.cuda.max_memory_allocated over "
          "the steps; ratio = measured / predicted)")

    print("\nbreakdown (GiB): the plan's train-phase accelerator parts; measured after building (weights + adapter, "
          "before the first step), peak reserved")
    for spec, variant, predicted, measured in rows:
        print(f"  {spec.label} {variant.name}: plan's peak phase {predicted.get('peak_phase')} "
              f"({gib(predicted.get('peak'), 0).strip()} GiB)")
        for name, value in predicted.get("parts", []):
            print(f"      {value / GiB:8.2f}  {name}")
        if "params" in measured:
            print(f"      measured: params {measured['params'] / 1e9:.3f} B, LoRA "
                  f"{measured.get('lora_params', 0) / 1e6:.2f} M ({measured.get('lora_with_grad')} of "
                  f"{measured.get('lora_tensors')} tensors with a nonzero gradient at step 1: the lora_B), build "
                  f"{measured.get('build_s', 0):.0f} s, last loss {measured.get('loss', float('nan')):.3f}")
            print(f"      measured after build {gib(measured.get('after_build'), 0).strip()} "
                  f"(plan's weights part {gib(predicted.get('weights'), 0).strip()}), "
                  f"peak reserved {gib(measured.get('reserved'), 0).strip()}")
        if measured.get("offloaded"):
            print(f"      {measured['offloaded']}")
        for note in predicted.get("notes", []):
            print(f"      plan note: {note}")
    import torch

    print(f"\n(torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, "
          f"total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
