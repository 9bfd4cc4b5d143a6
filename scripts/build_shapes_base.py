"""Build ``builtin:shapes-base``: a tiny FLUX.1 Kontext that really edits ``builtin:shapes`` images.

    nice .venv/bin/python scripts/build_shapes_base.py   # -> packages/qflux-kontext/src/qflux_kontext/shapes_base

The real diffusers / transformers classes at tiny sizes (a diffusers folder that ``FluxKontextPipeline`` and the
``kontext`` trainer load like any other), trained here on CPU, deterministically: fixed seeds, one torch thread
(two builds give bit-identical safetensors). About 40 minutes on a busy 2-core machine (``build.json`` in the
folder records the settings, the versions, the time and the figures of the check below).

1. ``AutoencoderKL`` (3 blocks: VAE factor 4, 4 latent channels, no attention, 0.24 M parameters): trained to
   reconstruct flat shapes, half ``builtin:shapes`` images, half shapes of random colours (a codec: like a real
   VAE it knows every colour, and nothing of edits), on 32 px crops of 64 px images. Then ``shift_factor`` /
   ``scaling_factor`` are set so that the normalised latents of ``builtin:shapes`` have mean 0 and std 1.
2. The text encoders: the tiny random CLIP / T5 of ``builtin:tiny`` (``qflux_kontext.tiny``) as they are; T5's
   ``model_max_length`` is 16 (every ``builtin:shapes`` prompt is shorter). Prompts only need to differ.
3. ``FluxTransformer2DModel`` (1 double + 2 single blocks, 3 heads x 32, 0.7 M parameters): trained by flow
   matching on 4000 ``builtin:shapes`` edits at 64 px (recolour to one of its six colours, move by a quarter
   side), a tenth of them replaced by "" -> the reference unchanged, through the functions training uses
   (``qflux_kontext.encoding`` for latents and prompts, ``qflux_kontext.predict.forward``: the pipeline's packing
   and image ids, the reference at index 1; ``qflux.training.timesteps.add_noise``: ``x_t = (1 - s) x0 + s
   noise``, target ``noise - x0``), sigma uniform, guidance drawn in [1, 4] so that any ``guidance_scale``
   samples alike.

It never sees the colour pink: ``builtin:shapes-pink`` (every edit turns a shape pink) is the new edit the demo
teaches with a LoRA. The weights are stored in float16 (2.3 MB); the check at the end samples the written folder
through the ordinary loading code, as validation does (8 steps, guidance 1): the edit score and unedited PSNR on
held-out ``builtin:shapes`` edits and on ``builtin:shapes-pink`` ones.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "packages" / "qflux-kontext" / "src" / "qflux_kontext" / "shapes_base"
SIZE = 64
SEED = 21

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels x 2x2 packing
    out_channels=None,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=64,  # T5 d_model of builtin:tiny
    pooled_projection_dim=32,  # CLIP hidden of builtin:tiny
    guidance_embeds=True,
    # rope: 7 frequencies per image axis (1 ... 1e-4 rad per token): the slow ones tell the 8 rows of a 64 px
    # image apart, which (8, 12, 12)'s or (4, 6, 6)'s few frequencies do poorly, so copying the reference's
    # token at the same place is learnt much sooner
    axes_dims_rope=(4, 14, 14),
)
T5_LENGTH = 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. the VAE -------------------------------------------------------------------------------------------------


def random_scene(rng: random.Random, size: int = SIZE) -> Image.Image:
    """1-4 flat shapes of random colours and sizes on the shapes' background or a random one."""
    from qflux.data.shapes import BACKGROUND

    bg = BACKGROUND if rng.random() < 0.75 else tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        r = rng.randint(3, 10)
        cx, cy = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
        colour = tuple(rng.randrange(256) for _ in range(3))
        box = (cx - r, cy - r, cx + r, cy + r)
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    return image


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1], as ``VaeImageProcessor.preprocess`` gives."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def vae_batch(rng: random.Random, n: int) -> torch.Tensor:
    from qflux.data.shapes import make_example

    images = []
    for _ in range(n):
        if rng.random() < 0.5:
            ex = make_example(1_000_000 + rng.randrange(1_000_000), SIZE, SIZE)
            images.append(ex.control if rng.random() < 0.5 else ex.target)
        else:
            images.append(random_scene(rng))
    return to_tensor(images)


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train_vae(steps: int, batch: int = 16, crop: int = 32, lr: float = 2e-3):
    """Reconstruction (L1 + L2, a tiny KL) on random ``crop`` px crops of 64 px images: the VAE has no attention,
    so it is fully convolutional and crops teach it what whole images would (a crop's edges are zero-padded like
    an image's borders), 4x cheaper."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(f"{SEED}/vae")
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        x = vae_batch(rng, batch)
        if crop < SIZE:
            ox, oy = rng.randrange(SIZE - crop + 1), rng.randrange(SIZE - crop + 1)
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mode()).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_vae(vae) -> None:
    """``shift_factor`` / ``scaling_factor``: normalised latents of ``builtin:shapes`` have mean 0, std 1."""
    from qflux.data.shapes import make_example

    images = []
    for i in range(64):
        ex = make_example(2_000_000 + i, SIZE, SIZE)
        images += [ex.control, ex.target]
    z = vae.encode(to_tensor(images)).latent_dist.mode()
    shift, scale = float(z.mean()), 1.0 / float(z.std())
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    log(f"vae latents: shift_factor {vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor}")
    log(f"vae round trip of builtin:shapes-pink targets: {json.dumps(vae_check(vae))}")


@torch.no_grad()
def vae_check(vae, count: int = 24) -> dict[str, float]:
    """The ceiling the VAE sets on the demo's figures: the pink targets through encode / decode, their edit
    score (pink within 0.15) and the PSNR of the rest."""
    from qflux.data.shapes import make_example
    from qflux.fidelity import edit_score, psnr

    scores, psnrs = [], []
    for i in range(count):
        ex = make_example(3_000_000 + i, SIZE, SIZE, "pink")
        rec = vae.decode(vae.encode(to_tensor([ex.target])).latent_dist.mode()).sample[0]
        image = Image.fromarray(((rec.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        edited = np.asarray(ex.mask) == 255
        scores.append(edit_score(ex.target, image, edited))
        psnrs.append(psnr(ex.target, image, ~edited))
    return {"edit_score": round(float(np.mean(scores)), 3), "unedited_psnr": round(float(np.mean(psnrs)), 2)}


# ---- 2. the encoders --------------------------------------------------------------------------------------------


def encoders_of(vae):
    from qflux_kontext.encoders import KontextEncoders
    from qflux_kontext.tiny import SCHEDULER_CONFIG, tiny_text_encoders

    text = tiny_text_encoders()
    text["tokenizer_2"].model_max_length = T5_LENGTH
    return KontextEncoders(vae=vae, scheduler_config=dict(SCHEDULER_CONFIG), max_sequence_length=T5_LENGTH, **text)


# ---- 3. the transformer -----------------------------------------------------------------------------------------


@torch.no_grad()
def encode_edits(encoders, count: int, identity: float = 0.1) -> dict[str, torch.Tensor]:
    """``count`` ``builtin:shapes`` samples at 64 px (indices from 0) as packed latents and prompt embeddings;
    a fraction ``identity`` of them is the pair (control, control) with the prompt "" instead."""
    from qflux.data.shapes import make_example
    from qflux_kontext.encoding import encode_images, encode_prompts

    rng = random.Random(f"{SEED}/identity")
    controls, targets, prompts = [], [], []
    for i in range(count):
        ex = make_example(i, SIZE, SIZE)
        keep = rng.random() < identity
        controls.append(ex.control)
        targets.append(ex.control if keep else ex.target)
        prompts.append("" if keep else ex.prompt)
    target = torch.stack(encode_images(encoders, targets))
    control = torch.stack(encode_images(encoders, controls))
    unique = sorted(set(prompts))
    hidden, pooled = encode_prompts(encoders, unique, T5_LENGTH)
    index = torch.tensor([unique.index(p) for p in prompts])
    log(f"encoded {count} edits ({len(unique)} prompts)")
    return {"target": target, "control": control, "hidden": hidden.float()[index], "pooled": pooled.float()[index]}


def train_transformer(data: dict[str, torch.Tensor], steps: int, batch: int = 16, lr: float = 2e-3):
    from diffusers import FluxTransformer2DModel

    from qflux.training.timesteps import add_noise
    from qflux_kontext.packing import token_grid
    from qflux_kontext.predict import forward

    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    grid = token_grid(SIZE, SIZE, 4)
    count = data["target"].shape[0]
    start, running = time.time(), None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(count, (batch,), generator=generator)
        x0 = data["target"][idx]
        sigmas = torch.rand(batch, generator=generator).clamp(1e-4, 1 - 1e-4)
        noise = torch.randn(x0.shape, generator=generator)
        guidance = float(1.0 + 3.0 * torch.rand((), generator=generator))
        noisy = add_noise(x0, sigmas, noise)
        v = forward(transformer, noisy.latents, sigmas, data["hidden"][idx], data["pooled"][idx], grid,
                    [data["control"][idx]], [grid], guidance)
        loss = (v - noisy.target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps}: loss {running:.4f} ({time.time() - start:.0f} s)")
    return transformer.eval().requires_grad_(False)


# ---- save, then check through the ordinary loading code ---------------------------------------------------------


def save(out: Path, transformer, encoders) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(encoders.scheduler_config),
        vae=encoders.vae, text_encoder=encoders.text_encoder, tokenizer=encoders.tokenizer,
        text_encoder_2=encoders.text_encoder_2, tokenizer_2=encoders.tokenizer_2, transformer=transformer,
    )
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        torch.nn.Module.to(getattr(pipe, name), torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)


def check(source: str, cases: int = 12) -> dict[str, float]:
    """Edit score and unedited PSNR of the model at ``source`` on held-out ``builtin:shapes`` edits and on the
    new ``builtin:shapes-pink`` edits, sampled as validation does (8 steps, guidance 1)."""
    from qflux.config.schema import ModelConfig
    from qflux.data.shapes import make_example
    from qflux.plugins import build_registry
    from qflux.training.val_fidelity import measure_case
    from qflux.types import ModelBundle, SampleRequest

    model = ModelConfig(pretrained=source, dtype="float32", options={"sample_guidance": 1.0})
    trainer = build_registry().trainer("kontext")
    bundle = ModelBundle(trainer, model, trainer.load_transformer(model), trainer.load_encoders(model))
    out = {}
    for name, variant in (("shapes", None), ("pink", "pink")):
        scores, psnrs = [], []
        for i in range(cases):
            ex = make_example(3_000_000 + i, SIZE, SIZE, variant) if variant else make_example(3_000_000 + i, SIZE, SIZE)
            image = trainer.sample(bundle, SampleRequest(prompt=ex.prompt, controls=[ex.control], height=SIZE,
                                                         width=SIZE, steps=8, seed=i))
            case = measure_case([ex.control], ex.target, ex.mask, image)
            scores.append(case.edit_score)
            psnrs.append(case.unedited_psnr)
        out[f"{name}_edit_score"] = round(float(np.mean(scores)), 3)
        out[f"{name}_unedited_psnr"] = round(float(np.mean(psnrs)), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--transformer-steps", type=int, default=6000)
    parser.add_argument("--edits", type=int, default=4000, help="builtin:shapes samples encoded for the transformer")
    parser.add_argument("--vae-from", type=Path, help="reuse a VAE folder (skips step 1; experiments only)")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)  # deterministic (and polite on a shared machine)
    started = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32).eval().requires_grad_(False)
    else:
        vae = train_vae(args.vae_steps)
        calibrate_vae(vae)
    vae_done = time.time()
    encoders = encoders_of(vae)
    data = encode_edits(encoders, args.edits)
    transformer = train_transformer(data, args.transformer_steps)
    save(args.out, transformer, encoders)
    built = time.time() - started
    log(f"wrote {args.out} in {built:.0f} s")
    info = {"script": "scripts/build_shapes_base.py", "seed": SEED, "vae_steps": args.vae_steps,
            "transformer_steps": args.transformer_steps, "edits": args.edits, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "threads": 1,
            "seconds": {"vae": round(vae_done - started), "all": round(built)}}
    if not args.no_check:
        info["check"] = check(str(args.out))
        log(json.dumps(info["check"]))
    (args.out / "build.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
