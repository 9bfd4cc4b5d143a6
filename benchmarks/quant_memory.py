"""Memory and speed of the qflux-quant backends on a Kontext-shaped FLUX transformer (random init).

    .venv/bin/python benchmarks/quant_memory.py                 # bf16 / fp8 / int8 / nf4 / fp4, both skip lists
    .venv/bin/python benchmarks/quant_memory.py --skip blocks   # only quantize_skip: []
    .venv/bin/python benchmarks/quant_memory.py --device cuda   # on a GPU (peak = torch.cuda.max_memory_allocated)

The model: ``FluxTransformer2DModel`` with FLUX.1 Kontext-dev's shape (head dim 128, T5 width 4096, CLIP pooled
768, 64 packed latent channels, guidance embedding, 1 double : 2 single blocks) at 4 heads (width 512) and
6 + 12 blocks: about 108M parameters, built in bfloat16.

Per method, in a fresh subprocess (so that peaks do not mix): quantize (``qflux_quant.quantize``), count the
transformer's weight bytes (parameters + buffers, bitsandbytes packed storage and quant states included),
attach a LoRA r16 on the attention projections (to_q, to_k, to_v, to_out.0; float32 as the trainer does),
then run training steps (forward + backward + AdamW) on one Kontext-shaped sample: 256x256 target and control
(256 + 256 image tokens) and 64 prompt tokens. ``peak RSS`` is the process's resident peak during the steps
(VmHWM, reset after quantization and after freed memory has been handed back to the OS), so it is the resident
weights plus what the step itself needs; on CPU it also holds the ~0.5 GiB of loaded libraries (torch, diffusers,
peft, bitsandbytes: the same in every row), so ``minus libs`` subtracts the RSS measured right after the imports. ``step`` is the median wall time of the steps after the first.

Two skip lists: ``default`` is ``model.quantize_skip``'s default (``[]``: every linear inside the transformer
blocks and the input projections ``x_embedder`` / ``context_embedder`` quantized), and ``keep-modulation`` is
``["norm", "proj_out"]`` (substrings, so the AdaLN modulation linears ``norm1.linear`` and the single blocks'
``proj_out`` stay in bf16). The timestep / guidance / text embeddings, the final norm and ``proj_out`` (1.8 %
of this small model's weights, 0.4 % of the real 11.9B one) stay in bf16 either way.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("none", "fp8", "int8", "nf4", "fp4")
SKIPS = {"default": None, "keep-modulation": ["norm", "proj_out"]}  # None: the config schema's default list
TARGETS = {"fp8": 0.52, "int8": 0.52, "nf4": 0.30, "fp4": 0.30}
MODEL = dict(
    patch_size=1, in_channels=64, num_layers=6, num_single_layers=12, attention_head_dim=128, num_attention_heads=4,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# --------------------------------------------------------------------------- one measurement (subprocess)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _inputs(torch, device, dtype, resolution: int, text_tokens: int, seed: int = 0) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(seed)
    side = resolution // 16
    n = side * side

    def ids(index: int):
        t = torch.zeros(side, side, 3)
        t[..., 0] = index
        t[..., 1] = torch.arange(side)[:, None]
        t[..., 2] = torch.arange(side)[None, :]
        return t.reshape(-1, 3)

    inputs = dict(
        hidden_states=torch.randn(1, 2 * n, 64, generator=g),  # target tokens, then the control's
        encoder_hidden_states=torch.randn(1, text_tokens, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([1.0]),
        img_ids=torch.cat([ids(0), ids(1)]),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if k not in ("img_ids", "txt_ids") else v
    return out, n


def measure(method: str, skip: str, steps: int, resolution: int, text_tokens: int, device_name: str) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from qflux.config.schema import ModelConfig
    from qflux_quant.memory import weight_bytes
    from qflux_quant.quantize import quantize_transformer

    try:  # every worker loads the same libraries, so that their resident size is the same in each row
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    os.environ.setdefault("QFLUX_QUANTIZE_DEVICE", device_name)
    _trim()
    rss_libs = _rss_kib("VmRSS")
    device = torch.device(device_name)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**MODEL)
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    full_bytes = weight_bytes(model)
    started = time.perf_counter()
    report = None
    if method != "none":
        kwargs = {} if SKIPS[skip] is None else {"quantize_skip": SKIPS[skip]}
        model, report = quantize_transformer(model, method, ModelConfig(dtype="bfloat16", quantize=method, **kwargs))
    quantize_s = time.perf_counter() - started
    _trim()
    wbytes = weight_bytes(model)

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    opt = torch.optim.AdamW(lora, lr=1e-4)
    inputs, n = _inputs(torch, device, dtype, resolution, text_tokens)
    target = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(1)).to(device)
    model.train()

    _trim()
    rss_before = _rss_kib("VmRSS")
    peak_ok = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        pred = model(**inputs, return_dict=False)[0][:, :n]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {
        "method": method,
        "skip": skip,
        "device": device_name,
        "params": params,
        "full_bytes": full_bytes,
        "weight_bytes": wbytes,
        "quantized_layers": len(report.quantized) if report else 0,
        "quantized_share": (report.quantized_params / max(report.quantized_params + report.kept_params, 1))
        if report else 0.0,
        "quantize_s": quantize_s,
        "rss_libs_mib": rss_libs / 1024,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": _rss_kib("VmHWM") / 1024,  # whole-process peak if the reset failed
        "peak_rss_is_step_only": peak_ok,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "first_step_s": times[0],
        "loss": float(loss.detach()),
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_before_mib"] = cuda_before / 2**20
    return result


# --------------------------------------------------------------------------- full-size estimate


def full_size_estimate(methods: list[str], skips: list[str]) -> dict[tuple[str, str], float]:
    """Weight-byte ratio to bf16 of the real FLUX.1 Kontext-dev transformer (19 + 38 blocks, width 3072, 11.9B
    parameters), estimated: its layer inventory on the meta device (no memory), the same layer selection, and
    the bytes per weight of each method measured on one 3072 x 3072 bf16 layer (scales and bias included)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from qflux_quant.memory import weight_bytes
    from qflux_quant.quantize import quantize_linear, select_linears

    with torch.device("meta"):
        full = FluxTransformer2DModel(guidance_embeds=True)
    total = sum(p.numel() for p in full.parameters())
    torch.manual_seed(0)
    probe = torch.nn.Linear(3072, 3072).to(torch.bfloat16)
    out = {}
    for method in methods:
        if method == "none":
            continue
        per_weight = weight_bytes(quantize_linear(probe, method, torch.bfloat16, torch.device("cpu"))) / probe.weight.numel()
        for skip in skips:
            chosen, _ = select_linears(full, [] if SKIPS[skip] is None else SKIPS[skip])
            quantized = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for _, m in chosen)
            q_weights = sum(m.weight.numel() for _, m in chosen)
            out[(method, skip)] = ((total - quantized) * 2 + q_weights * per_weight) / (total * 2)
    return out


# --------------------------------------------------------------------------- driver


def _run_child(method: str, skip: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--skip", skip, "--steps", str(args.steps),
           "--resolution", str(args.resolution), "--text-tokens", str(args.text_tokens), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method}/{skip} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], estimate: dict[tuple[str, str], float]) -> str:
    base = next(r for r in rows if r["method"] == "none")
    cuda = "cuda_peak_mib" in base
    peak_key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    for r in rows:
        r["above_libs_mib"] = r["cuda_peak_mib"] if cuda else r["peak_rss_mib"] - r["rss_libs_mib"]
    head = (f"{'method':<6} {'weights MiB':>11} {'x bf16':>7} {'target':>10} {'quantized':>9} "
            f"{'peak ' + ('CUDA' if cuda else 'RSS') + ' MiB':>14} {'x bf16':>7} {'minus libs':>10} {'x bf16':>7} "
            f"{'step s':>7} {'x bf16':>7} {'12B est.':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["weight_bytes"] / base["weight_bytes"]
        target = TARGETS.get(r["method"])
        mark = "" if target is None else (f"<={target:.2f}" + (" ok" if ratio <= target else " NO"))
        share = f"{100 * r['quantized_share']:.0f}%" if r["method"] != "none" else "-"
        lines.append(
            f"{r['method'] if r['method'] != 'none' else 'bf16':<6} {r['weight_bytes'] / 2**20:>11.1f} {ratio:>7.3f} "
            f"{mark:>10} {share:>9} {r[peak_key]:>14.0f} {r[peak_key] / base[peak_key]:>7.2f} "
            f"{r['above_libs_mib']:>10.0f} {r['above_libs_mib'] / base['above_libs_mib']:>7.2f} "
            f"{r['step_s']:>7.2f} {r['step_s'] / base['step_s']:>7.2f} "
            f"{estimate.get((r['method'], r['skip']), 1.0):>8.3f}"
        )
    return "\n".join(lines)


def _header(base: dict, args: argparse.Namespace) -> str:
    return (f"Kontext-shaped FluxTransformer2DModel, {base['params'] / 1e6:.1f}M parameters, bf16, device "
            f"{base['device']}; LoRA r16 on {', '.join(LORA_TARGETS)}; {args.resolution}px target + control "
            f"({2 * (args.resolution // 16) ** 2} image tokens) + {args.text_tokens} text tokens; {args.steps} "
            "steps, step time = median after the first; '12B est.': weight ratio of the real 11.9B FLUX.1 "
            "Kontext-dev transformer with the same layer selection (estimate)")


def _report(results: list[dict], args: argparse.Namespace) -> None:
    base = next(r for r in results if r["method"] == "none")
    skips = list(dict.fromkeys(r["skip"] for r in results if r["method"] != "none"))
    methods = list(dict.fromkeys(r["method"] for r in results))
    estimate = full_size_estimate(methods, skips)
    print(_header(base, args))
    for skip in skips:
        rows = [dict(base, skip=skip)] + [r for r in results if r["method"] != "none" and r["skip"] == skip]
        listed = "quantize_skip: [] (default)" if skip == "default" else "quantize_skip: [norm, proj_out]"
        print(f"\n{listed}\n{_table(rows, estimate)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip", choices=[*SKIPS, "both"], default="both")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument("--from-json", help="print the tables of a previous --json file instead of measuring")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.worker, args.skip, args.steps, args.resolution, args.text_tokens, args.device)))
        return
    if args.from_json:
        with open(args.from_json) as f:
            _report(json.load(f), args)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "none"]
    skips = list(SKIPS) if args.skip == "both" else [args.skip]
    results = [_run_child("none", skips[0], args)]
    for skip in skips:
        for method in methods:
            results.append(_run_child(method, skip, args))
            print(f"measured {method} ({skip})", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    _report(results, args)


if __name__ == "__main__":
    main()
