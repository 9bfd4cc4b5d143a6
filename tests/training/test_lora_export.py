"""The exported LoRA has one strength everywhere (issue 13 §4) and only keys ComfyUI maps.

- The weight change computed from the FILE by ComfyUI's rule and the one diffusers fuses
  (``load_lora_weights`` + ``fuse_lora``) both equal peft's live ``scaling * B @ A`` within 1e-3 relative,
  for rank 4 / alpha 8 and rank 16 / alpha 1 on the tiny Kontext and Qwen transformers. Unbaked (today's
  metadata-only alpha) the ComfyUI delta is off by alpha / rank: 2x and 1/16x.
- Every key of each trainer's export, with the default targets and with every linear layer targeted, is one
  that ComfyUI's key mapping for that model family maps (helpers below reproduce ComfyUI's rule).
- ``extra_metadata`` lands in the header next to diffusers' ``lora_adapter_metadata`` and is read back by
  ``read_lora_metadata``; nothing but the LoRA is left in the folder.

ComfyUI's rule, as read in comfyanonymous/ComfyUI: ``comfy/lora.py`` ``model_lora_keys_unet`` builds the key
map, ``load_lora`` takes ``{x}.alpha`` only from a tensor, ``comfy/weight_adapter/lora.py``
``LoRAAdapter.load`` accepts ``{x}.lora_B.weight`` / ``{x}.lora_A.weight`` and ``calculate_weight`` adds
``strength * (alpha / rank if an alpha tensor else 1.0) * up @ down`` (sliced into a fused qkv weight or
scale/shift-swapped for Flux, which changes where the delta goes but not the delta).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qflux.adapters.lora_files import ADAPTER, LORA_FILE, attach_lora, export_lora, pipeline_class, read_lora_metadata
from qflux.config.schema import LoraConfig, ModelConfig
from qflux.plugins import build_registry
from qflux.testing import single_torch_thread


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


# --------------------------------------------------------------------------- ComfyUI's key mapping, reproduced


def comfyui_flux_lora_prefixes(depth: int, depth_single_blocks: int) -> set[str]:
    """The LoRA key prefixes ComfyUI maps for a Flux model (FLUX.1 Kontext is ``model_base.Flux``):
    ``"transformer." + k`` for every ``k`` ending in ``.weight`` of ``comfy.utils.flux_to_diffusers`` with the
    model's ``depth`` (double blocks) and ``depth_single_blocks``."""
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
              "ff_context.linear_out", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out", "attn.norm_q",
              "attn.norm_k", "attn.to_qkv_mlp_proj", "attn.to_out"]
    basic = ["proj_out", "x_embedder", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2", "context_embedder", "time_text_embed.text_embedder.linear_1",
             "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
             "time_text_embed.guidance_embedder.linear_2", "norm_out.linear", "controlnet_x_embedder"]
    keys = {f"transformer_blocks.{i}.{k}" for i in range(depth) for k in double}
    keys |= {f"single_transformer_blocks.{i}.{k}" for i in range(depth_single_blocks) for k in single}
    return {f"transformer.{k}" for k in keys | set(basic)}


def comfyui_qwen_image_lora_prefixes(num_layers: int) -> set[str]:
    """The LoRA key prefixes ComfyUI maps for ``model_base.QwenImage``: ``key`` and ``"transformer." + key`` for
    every weight ``diffusion_model.{key}.weight`` of ``comfy/ldm/qwen_image/model.py``'s
    ``QwenImageTransformer2DModel`` (its module names, written out here from that file)."""
    block = ["img_mod.1", "txt_mod.1", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
             "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
             "txt_mlp.net.2"]
    top = ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2", "txt_norm",
           "img_in", "txt_in", "norm_out.linear", "proj_out"]
    keys = {f"transformer_blocks.{i}.{k}" for i in range(num_layers) for k in block} | set(top)
    return keys | {f"transformer.{k}" for k in keys}


def comfyui_prefixes(transformer: torch.nn.Module) -> set[str]:
    config = transformer.config
    if type(transformer).__name__ == "FluxTransformer2DModel":
        return comfyui_flux_lora_prefixes(config.num_layers, config.num_single_layers)
    return comfyui_qwen_image_lora_prefixes(config.num_layers)


def comfyui_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per LoRA key prefix: the weight change ComfyUI applies at strength 1, from the file's tensors only."""
    deltas = {}
    for key, up in state.items():
        if key.endswith(".lora_B.weight"):
            x = key.removesuffix(".lora_B.weight")
            down = state[f"{x}.lora_A.weight"].float()
            alpha = state[f"{x}.alpha"].item() / down.shape[0] if f"{x}.alpha" in state else 1.0
            deltas[x] = alpha * (up.float() @ down)
    return deltas


# --------------------------------------------------------------------------- tiny transformers with a LoRA


def leaf_targets(transformer: torch.nn.Module) -> list[str]:
    """``model.lora.targets`` naming every linear layer (peft matches them as name suffixes)."""
    def leaf(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]

    return sorted({leaf(n) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)})


def load_transformer(trainer_name: str = "kontext") -> torch.nn.Module:
    registry = build_registry()
    model = ModelConfig(pretrained="builtin:tiny", dtype="float32")
    return registry.trainer(trainer_name).load_transformer(model)


def with_random_lora(trainer_name: str, lora: LoraConfig, seed: int = 0) -> torch.nn.Module:
    """A tiny transformer with a LoRA whose B is non-zero (gaussian init leaves it zero)."""
    transformer = load_transformer(trainer_name)
    attach_lora(transformer, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def live_deltas(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> peft's ``scaling * B @ A`` on the live adapter."""
    return {name: m.scaling[ADAPTER] * (m.lora_B[ADAPTER].weight @ m.lora_A[ADAPTER].weight).detach()
            for name, m in transformer.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}


def pipeline_without_encoders(cls: type, transformer: torch.nn.Module):
    """The pipeline with only its transformer: ``load_lora_weights`` / ``fuse_lora`` touch nothing else."""
    import inspect

    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "transformer")]
    return cls(transformer=transformer, **{n: None for n in names})


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- one strength everywhere

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"]


@pytest.mark.parametrize("rank, alpha", [(4, 8.0), (16, 1.0)])
@pytest.mark.parametrize("trainer_name", ["kontext", "qwen-edit"])
def test_comfyui_rule_and_diffusers_fuse_give_peft_live_delta(trainer_name, rank, alpha, tmp_path):
    lora = LoraConfig(rank=rank, alpha=alpha, targets=TARGETS)
    trained = with_random_lora(trainer_name, lora)
    live = live_deltas(trained)
    trainer = build_registry().trainer(trainer_name)
    path = export_lora(trained, trainer.info.pipeline, lora, tmp_path / "out", {"qflux.note": "x"})

    # ComfyUI: the file's tensors only (it never reads the metadata)
    state = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in state)  # diffusers' Qwen loader would convert such a file
    comfy = comfyui_deltas(state)
    assert set(comfy) == {f"transformer.{m}" for m in live}
    worst = max(relative(comfy[f"transformer.{m}"], d) for m, d in live.items())
    assert worst <= 1e-3, f"ComfyUI's strength differs from training: relative error {worst:.3g}"

    # diffusers: the trainer's pipeline class loads and fuses the file onto a fresh base
    base = load_transformer(trainer_name)
    before = {n: m.weight.detach().clone() for n, m in base.named_modules() if n in live}
    pipe = pipeline_without_encoders(pipeline_class(trainer.info.pipeline), base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    fused = {n: m.get_base_layer().weight.detach() for n, m in base.named_modules() if n in live}
    worst = max(relative(fused[m] - before[m], d) for m, d in live.items())
    assert worst <= 1e-3, f"diffusers' strength differs from training: relative error {worst:.3g}"


# --------------------------------------------------------------------------- keys ComfyUI maps


@pytest.mark.parametrize("targets", ["default", "all-linear"])
@pytest.mark.parametrize("trainer_name", ["kontext", "qwen-edit", "qwen-edit-plus", "qwen-edit-2511"])
def test_every_exported_key_is_mapped_by_comfyui(trainer_name, targets, tmp_path):
    transformer = load_transformer(trainer_name)
    linear = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = LoraConfig(rank=2, alpha=4) if targets == "default" else \
        LoraConfig(rank=2, alpha=4, targets=leaf_targets(transformer))
    attach_lora(transformer, lora)
    path = export_lora(transformer, build_registry().trainer(trainer_name).info.pipeline, lora, tmp_path)
    keys = set(load_file(str(path)))
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert keys == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}  # LoRAAdapter's "diffusers2" form
    if targets == "all-linear":
        assert modules == {f"transformer.{n}" for n in linear}  # the targets really reach every linear layer
    unmapped = sorted(modules - comfyui_prefixes(transformer))
    assert not unmapped, f"ComfyUI would not load {len(unmapped)} LoRA modules, e.g. {unmapped[:3]}"


# --------------------------------------------------------------------------- metadata and the written file


def test_extra_metadata_is_a_header_entry_next_to_the_adapter_metadata(tmp_path):
    import json

    lora = LoraConfig(rank=4, alpha=8)
    transformer = load_transformer("kontext")
    attach_lora(transformer, lora)
    path = export_lora(transformer, build_registry().trainer("kontext").info.pipeline, lora, tmp_path / "run",
                       extra_metadata={"qflux.training_sizes": '{"target": [512, 512]}'})
    assert path == tmp_path / "run" / LORA_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [LORA_FILE]  # the temporary file was renamed
    header = read_lora_metadata(path)
    assert header["qflux.training_sizes"] == '{"target": [512, 512]}'
    adapter = json.loads(header["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4  # baked: alpha = rank
    with pytest.raises(ValueError, match="reserved"):
        export_lora(transformer, build_registry().trainer("kontext").info.pipeline, lora, tmp_path / "x",
                    extra_metadata={"lora_adapter_metadata": "{}"})
