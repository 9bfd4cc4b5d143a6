"""Static GPU memory of LoRA training on the full-size models: COMPUTED from parameter counts, not measured.

The full-size transformers are built on the meta device (``accelerate.init_empty_weights``: no memory, no
download), from the diffusers class defaults:

- FLUX.1 Kontext-dev: ``FluxTransformer2DModel(guidance_embeds=True)`` (19 double + 38 single blocks, ~11.9 B)
- Qwen-Image / Qwen-Image-Edit (all variants): ``QwenImageTransformer2DModel()`` (60 blocks, ~20.4 B)

For each: the weight bytes of the frozen base in bf16, fp8, int8 and nf4, and the LoRA r16 training state on
the default targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, peft's suffix matching): float32 weights +
float32 gradients + AdamW's two float32 moments = 16 bytes per LoRA parameter.

Quantized formats (as qflux-quant stores them):

- which layers: every ``nn.Linear`` inside the repeated blocks, and the input projections (``x_embedder``,
  ``context_embedder``; Qwen's ``img_in``, ``txt_in``), whose name contains none of ``model.quantize_skip``
  (default ``[]``); everything else stays bf16 (biases, norms, the timestep/guidance/text embeddings, the final
  norm and projection, skipped layers). The same numbers for ``quantize_skip: [norm, proj_out]`` (which also
  keeps the AdaLN modulation linears and FLUX's single-block ``proj_out``) are printed too.
- fp8 (``Float8Linear``): 1 byte per weight + a float32 scale per output row.
- int8 (bitsandbytes ``Linear8bitLt``): 1 byte per weight + a float32 scale per output row (``SCB``).
- nf4 (bitsandbytes ``Linear4bit``, blocksize 64, ``compress_statistics=True``): 0.5 byte per weight + one
  8-bit absmax per 64 weights + one float32 absmax per 256 of those + the code tables (~1 KiB per layer).

NOT included: activations (they depend on resolution, batch and gradient checkpointing and add several GB at
1024 px even with checkpointing), the CUDA context (~0.5-1 GB), allocator fragmentation, and the text
encoders / VAE, which a run with a complete embedding cache loads only for validation sampling (their size is
printed separately).

    .venv/bin/python benchmarks/vram_estimate.py [--rank 16]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

GiB = 2**30
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq (fp32)
NF4_BLOCK, NF4_BLOCK2 = 64, 256


def build_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(guidance_embeds=True)


def build_qwen() -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel()


def kontext_encoders() -> dict[str, nn.Module]:
    """T5 v1.1 XXL encoder, CLIP ViT-L/14 text model, FLUX VAE (configs of black-forest-labs/FLUX.1-Kontext-dev)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    return {"T5-XXL encoder": T5EncoderModel(t5), "CLIP-L text": CLIPTextModel(clip), "VAE": vae}


def qwen_encoders() -> dict[str, nn.Module]:
    """Qwen2.5-VL-7B-Instruct (text + vision tower + lm_head, as the pipelines load it) and the Qwen-Image VAE."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
        tie_word_embeddings=False,
    )
    return {"Qwen2.5-VL-7B": Qwen2_5_VLForConditionalGeneration(config), "VAE": AutoencoderKLQwenImage()}


def build_flux2_dev() -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel()  # the class defaults are FLUX.2 [dev]'s config (8 + 48 blocks, 32.2 B)


def build_flux2_klein(size: str) -> Callable[[], nn.Module]:
    """FLUX.2 [klein] base 4B (5 + 20 blocks, 24 heads, Qwen3-4B: 3 x 2560) / 9B (8 + 24, 32 heads, Qwen3-8B:
    3 x 4096), the values of their transformer/config.json; the parameter counts (3.88 B, 9.08 B) match the names."""
    from diffusers import Flux2Transformer2DModel

    sizes = {"4B": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
             "9B": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)}
    return lambda: Flux2Transformer2DModel(guidance_embeds=False, **sizes[size])


def flux2_dev_encoders() -> dict[str, nn.Module]:
    """Mistral-Small-3.1-24B (Mistral3ForConditionalGeneration: text model, Pixtral vision tower, lm_head) and the
    FLUX.2 VAE (``AutoencoderKLFlux2`` defaults)."""
    from diffusers import AutoencoderKLFlux2
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=1540, patch_size=14),
        tie_word_embeddings=False,
    )
    return {"Mistral-3.1-24B": Mistral3ForConditionalGeneration(config), "VAE": AutoencoderKLFlux2()}


def flux2_klein_encoders(size: str) -> Callable[[], dict[str, nn.Module]]:
    """Qwen3-4B (tied embeddings) or Qwen3-8B as ``Qwen3ForCausalLM``, and the FLUX.2 VAE."""

    def build() -> dict[str, nn.Module]:
        from diffusers import AutoencoderKLFlux2
        from transformers import Qwen3Config, Qwen3ForCausalLM

        dims = {"4B": dict(hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
                "8B": dict(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)}[size]
        config = Qwen3Config(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, **dims)
        return {f"Qwen3-{size}": Qwen3ForCausalLM(config), "VAE": AutoencoderKLFlux2()}

    return build


def build_qwen21() -> nn.Module:
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel()  # the class defaults are Qwen-Image 2.1's config (32 blocks, 4096 wide)


def qwen21_encoders() -> dict[str, nn.Module]:
    """Qwen3-VL-8B (text 4096 wide, 36 layers; vision tower 27 layers, 1152 wide, deepstack 8/16/24) and the
    RGBA Qwen-Image 2.1 VAE (``AutoencoderKLQwenImage21`` defaults)."""
    from diffusers import AutoencoderKLQwenImage21
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False,
    )
    return {"Qwen3-VL-8B": Qwen3VLForConditionalGeneration(config), "VAE": AutoencoderKLQwenImage21()}


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, nn.Module]]]] = {
    "FLUX.1-Kontext-dev": (build_flux, kontext_encoders),
    "Qwen-Image-Edit": (build_qwen, qwen_encoders),
    "FLUX.2-dev": (build_flux2_dev, flux2_dev_encoders),
    "FLUX.2-klein-base-4B": (build_flux2_klein("4B"), flux2_klein_encoders("4B")),
    "FLUX.2-klein-base-9B": (build_flux2_klein("9B"), flux2_klein_encoders("8B")),
    "Qwen-Image-2.1": (build_qwen21, qwen21_encoders),
}


def on_meta(build: Callable[[], object]) -> object:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return build()


# --------------------------------------------------------------------------- selection and bytes


def block_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if name and isinstance(m, nn.ModuleList)]


INPUT_PROJECTIONS = ("x_embedder", "context_embedder", "img_in", "txt_in")
KEEP_MODULATION = ["norm", "proj_out"]


def quantized_linears(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """qflux-quant's rule: Linear layers inside the blocks or projecting the inputs, whose name contains none of
    ``skip``. Written out here, not imported, so that ``_check_against_qflux_quant`` compares two readings."""
    blocks = block_prefixes(model)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name in INPUT_PROJECTIONS or any(name.startswith(b) for b in blocks))
            and not any(p and p in name for p in skip)]


def quantized_weight_bytes(n: int, out_features: int, method: str) -> float:
    if method in ("fp8", "int8"):
        return n + 4 * out_features
    if method == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return n / 2 + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * 256 + 4 * 16 + 4
    raise ValueError(method)


def weight_bytes(model: nn.Module, method: str, skip: list[str]) -> float:
    """Bytes of the frozen base: quantized Linear weights in ``method``, every other tensor in bf16."""
    total = 2 * sum(p.numel() for p in model.parameters())
    if method == "bf16":
        return total
    for _, linear in quantized_linears(model, skip):
        n = linear.weight.numel()
        total += quantized_weight_bytes(n, linear.out_features, method) - 2 * n
    return total


def checkpointed_inputs_bytes(model: nn.Module, tokens: int, bytes_per: int = 2) -> tuple[float, int]:
    """Lower bound of the activations kept for backward with gradient checkpointing: every block's input
    hidden states ``[tokens, inner_dim]`` (image + text streams together) in bf16; (bytes, blocks). A block's
    own recompute during backward comes on top (roughly one block's full activations at a time)."""
    blocks = sum(len(m) for name, m in model.named_children() if isinstance(m, nn.ModuleList))
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    return blocks * tokens * inner * bytes_per, blocks


def lora_params(model: nn.Module, targets: list[str], rank: int) -> tuple[int, int]:
    """(LoRA parameters, adapted layers) with peft's matching: the module name equals a target or ends
    with ``"." + target``."""
    count = layers = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            count += rank * (m.in_features + m.out_features)
            layers += 1
    return count, layers


@dataclass
class Estimate:
    name: str
    params: int
    linear_params: int
    quantized: dict[str, tuple[int, int]]  # skip label -> (quantized weight params, layers)
    base: dict[tuple[str, str], float]  # (method, skip label) -> bytes
    lora: int
    lora_layers: int
    encoders: dict[str, tuple[int, float]]  # name -> (params, bf16 bytes)
    checkpointed: tuple[float, int]  # (bytes, blocks), see checkpointed_inputs_bytes


def estimate(name: str, rank: int, targets: list[str], skip: list[str], tokens: int) -> Estimate:
    build, encoders = MODELS[name]
    model = on_meta(build)
    assert next(model.parameters()).device.type == "meta"
    skips = {"default": skip, "keep-modulation": KEEP_MODULATION}
    base, quantized = {}, {}
    for label, s in skips.items():
        chosen = quantized_linears(model, s)
        quantized[label] = (sum(m.weight.numel() for _, m in chosen), len(chosen))
        for method in ("bf16", "fp8", "int8", "nf4"):
            base[(method, label)] = weight_bytes(model, method, s)
    _check_against_qflux_quant(model, skip, quantized["default"][1])
    lora, layers = lora_params(model, targets, rank)
    enc = {}
    for enc_name, module in on_meta(encoders).items():
        n = sum(p.numel() for p in module.parameters())
        enc[enc_name] = (n, 2.0 * n)
    return Estimate(name, sum(p.numel() for p in model.parameters()),
                    sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
                    quantized, base, lora, layers, enc, checkpointed_inputs_bytes(model, tokens))


def _check_against_qflux_quant(model: nn.Module, skip: list[str], layers: int) -> None:
    """When qflux-quant is installed, its own layer selection must pick the same layers as this script."""
    try:
        from qflux_quant.quantize import select_linears
    except Exception:  # noqa: BLE001 - the estimate does not need the plugin
        return
    chosen, _ = select_linears(model, skip)
    if len(chosen) != layers:
        raise SystemExit(f"qflux_quant.select_linears picks {len(chosen)} layers, this script {layers}: update it")


# --------------------------------------------------------------------------- output


def gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def main(argv: list[str] | None = None) -> int:
    from qflux.config.schema import LoraConfig, ModelConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=1024, help="square side for the activation bound")
    parser.add_argument("--controls", type=int, default=1, help="control images of the same size")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--targets", nargs="+", default=None, help="LoRA targets (default: model.lora.targets')")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    image_tokens = (args.resolution // 16) ** 2
    tokens = image_tokens * (1 + args.controls) + args.text_tokens
    targets = args.targets or LoraConfig().targets
    skip = ModelConfig().quantize_skip
    estimates = [estimate(name, args.rank, targets, skip, tokens) for name in args.models]

    print("STATIC MEMORY ESTIMATE, computed from parameter counts on the meta device; NOT measured on a GPU.")
    print("Activations, the CUDA context and allocator overhead are NOT included.\n")
    names = [e.name for e in estimates]
    print(f"{'':58s}" + "".join(f"{n:>22s}" for n in names))
    print(f"{'transformer parameters (B)':58s}" + "".join(f"{e.params / 1e9:22.3f}" for e in estimates))
    print(f"{'  of which nn.Linear weights (B)':58s}" + "".join(f"{e.linear_params / 1e9:22.3f}" for e in estimates))
    for label, text in (("default", "default quantize_skip"), ("keep-modulation", "quantize_skip [norm, proj_out]")):
        print(f"{'  quantized Linear weights, ' + text + ' (B, layers)':58s}"
              + "".join(f"{e.quantized[label][0] / 1e9:15.3f} ({e.quantized[label][1]:4d})" for e in estimates))
    print(f"\nfrozen base weights, GiB (default model.quantize_skip: {skip})")
    for method in ("bf16", "fp8", "int8", "nf4"):
        labels = ("default",) if method == "bf16" else ("default", "keep-modulation")
        for label in labels:
            suffix = "" if method == "bf16" else (" (default quantize_skip)" if label == "default" else
                                                  " (quantize_skip [norm, proj_out])")
            print(f"{'  ' + method + suffix:58s}" + "".join(f"{'':14s}{gib(e.base[(method, label)])}"
                                                            for e in estimates))
    print(f"\nLoRA r{args.rank} on {targets}")
    print(f"{'  adapted layers':58s}" + "".join(f"{e.lora_layers:22d}" for e in estimates))
    print(f"{'  trainable parameters (M)':58s}" + "".join(f"{e.lora / 1e6:22.2f}" for e in estimates))
    print(f"{'  fp32 weights + grads + AdamW states (16 B/param), GiB':58s}"
          + "".join(f"{'':14s}{gib(e.lora * LORA_BYTES_PER_PARAM)}" for e in estimates))
    print("\nstatic total = base weights + LoRA training state, GiB (activations NOT included)")
    for method in ("bf16", "fp8", "int8", "nf4"):
        print(f"{'  ' + method + ('' if method == 'bf16' else ' (default quantize_skip)'):58s}"
              + "".join(f"{'':14s}{gib(e.base[(method, 'default')] + e.lora * LORA_BYTES_PER_PARAM)}"
                        for e in estimates))
    print(f"\nactivations are NOT in the totals; for scale, a LOWER BOUND with gradient checkpointing at "
          f"{args.resolution} px, {args.controls} control(s), {args.text_tokens} text tokens ({tokens} tokens):")
    print(f"{'  checkpointed block inputs (bf16), GiB':58s}"
          + "".join(f"{'':14s}{gib(e.checkpointed[0])}" for e in estimates))
    print("  (+ one block's recompute during backward, attention and MLP buffers: the real figure is higher)")
    print("\nencoders in bf16, GiB: loaded to fill the embedding cache and for validation sampling (qflux moves them to\n"
          "the GPU for each sampling call); a run with a complete cache and no validation sampling never loads them")
    for e in estimates:
        parts = ", ".join(f"{n} {p / 1e9:.3f} B = {b / GiB:.2f}" for n, (p, b) in e.encoders.items())
        total = sum(b for _, b in e.encoders.values())
        print(f"  {e.name}: {parts}; total {total / GiB:.2f} GiB")
    print(f"\n(diffusers {__import__('diffusers').__version__}, transformers {__import__('transformers').__version__},"
          f" torch {torch.__version__}; 1 GiB = 2^30 bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
