"""``qflux plan``: a run's peak accelerator memory and peak host RAM, predicted before anything is loaded.

The run goes through phases, and each holds different things at once (``qflux.run.train``'s order):

- ``load``: the transformer read from its files into host RAM in ``model.dtype`` (``LOAD_COPIES``), then
  quantized and moved;
- ``encode``: the encoders (text encoders + VAE) on the device, when anything must be encoded (an
  incomplete embedding cache, validation requests): they are freed before the transformer loads;
- ``train``: the transformer (minus offloaded blocks, plus the ones in flight), the adapter's float32
  weights, gradients and optimizer state (and the EMA copy), and the activations of a step
  (``qflux.plan.activations``);
- ``validate``: the transformer and adapter, the VAE decoder and one denoising forward, then the decode.

The peak of a place is the largest phase total. On a machine without an accelerator every part is in host
RAM, with the libraries the process has imported (measured here: the planning process imports what a run
imports). ``parts`` lists the peak phase's parts per place, and every phase's total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qflux.plan.activations import (
    Tokens,
    backward_bytes,
    coefficients,
    cpu_step_bytes,
    kept_bytes,
    sampling_bytes,
)
from qflux.plan.weights import (
    TransformerWeights,
    adapter_numel,
    optimizer_state_bytes,
    transformer_weights,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qflux.config.schema import QfluxConfig
    from qflux.plugins import Registry
    from qflux.trainer import Trainer

GiB = 2**30
LOAD_COPIES = 1.0  # host copies of the transformer at the loader's peak (safetensors are memory-mapped: one)
CPU_RUNTIME = int(0.15 * GiB)  # a CPU run's own working set beyond the libraries (data, autograd, threads): measured
VAE_DECODE_FACTOR = 6.0  # decode working set: pixels x first decoder width x element size x this
VAE_TILE = 512 * 512  # diffusers' default tile (sample size) in pixels, with tiling on
RUNTIME_RESERVE = int(0.75 * GiB)  # CUDA context and allocator slack: kept free beside the plan's peak


@dataclass(frozen=True)
class Part:
    """One thing a phase holds: ``where`` is "accelerator" or "host"."""

    name: str
    where: str
    phase: str
    bytes: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "phase": self.phase, "gib": round(self.bytes / GiB, 4)}


@dataclass
class MemoryPlan:
    """The prediction: ``accelerator_bytes`` (None without an accelerator) and ``host_bytes`` are the peaks;
    ``parts`` every phase's parts; ``notes`` what the plan could not know."""

    accelerator: bool
    parts: list[Part]
    notes: list[str] = field(default_factory=list)
    offload_blocks: int = 0

    def phase_total(self, phase: str, where: str) -> int:
        return sum(p.bytes for p in self.parts if p.phase == phase and (p.where == where or where == "any"))

    def phases(self) -> list[str]:
        return list(dict.fromkeys(p.phase for p in self.parts))

    def peak(self, where: str) -> tuple[str, int]:
        totals = [(self.phase_total(ph, where), ph) for ph in self.phases()]
        value, phase = max(totals, default=(0, ""))
        return phase, value

    @property
    def accelerator_bytes(self) -> int | None:
        return self.peak("accelerator")[1] if self.accelerator else None

    @property
    def host_bytes(self) -> int:
        return self.peak("host")[1]

    @property
    def accelerator_gib(self) -> float | None:
        value = self.accelerator_bytes
        return None if value is None else round(value / GiB, 3)

    @property
    def host_gib(self) -> float:
        return round(self.host_bytes / GiB, 3)

    def as_json(self) -> dict[str, Any]:
        return {"accelerator_gib": self.accelerator_gib, "host_gib": self.host_gib,
                "peak_phase": {"accelerator": self.peak("accelerator")[0] if self.accelerator else None,
                               "host": self.peak("host")[0]},
                "offload_blocks": self.offload_blocks,
                "parts": [p.as_json() for p in self.parts], "notes": self.notes}


@dataclass(frozen=True)
class Inputs:
    """Everything the arithmetic needs, gathered once (``gather``); ``plan`` is pure and cheap, so the
    fitting search (``qflux.plan.fit``) re-plans variants without rebuilding models."""

    weights: TransformerWeights
    unquantized_weights: TransformerWeights
    adapter_params: int
    ks: list[float]
    tokens: Tokens
    sample_tokens: int
    sample_pixels: int
    encoders: int | None
    vae: int | None
    vae_width: int
    libraries: int
    uncalibrated: list[str]


def plan(config: QfluxConfig, inputs: Inputs, accelerator: bool, offload_blocks: int | None = None,
         world_size: int = 1) -> MemoryPlan:
    """The plan of ``config`` (its ``model.gradient_checkpointing``, ``train.batch_size``, optimizer, EMA,
    validation, ``model.offload_blocks`` unless ``offload_blocks`` says how many) from gathered ``inputs``."""
    model, train = config.model, config.train
    dev = "accelerator" if accelerator else "host"
    w = inputs.weights
    offload = offload_blocks if offload_blocks is not None else _offload_count(model.offload_blocks, w, accelerator)
    offloaded = sum(w.blocks[:offload])
    # backward: the block, its neighbour, the prefetch (never more than the blocks offloaded)
    in_flight = min(3, offload) * max(w.blocks[:offload], default=0)
    resident = w.total - offloaded + (in_flight if offload else 0)
    sharded = bool(train.fsdp) and world_size > 1
    if sharded:  # each process holds 1/N of the frozen base; one block is gathered at a time
        resident = resident // world_size + max(w.blocks, default=0)

    element = 2 if train.mixed_precision in ("bf16", "fp16") or model.dtype != "float32" else 4
    args = (inputs.ks, inputs.tokens.total, w.width, element, train.batch_size, model.gradient_checkpointing)
    adapter = inputs.adapter_params * 4
    state = inputs.adapter_params * (4 + optimizer_state_bytes(train.optimizer) + (4 if train.ema else 0))

    parts: list[Part] = []
    libraries = Part("libraries (torch, diffusers, transformers, peft: this process's RSS after importing them)",
                     "host", "", inputs.libraries)
    for phase in ("load", "encode", "train", "validate"):
        parts.append(Part(libraries.name, "host", phase, libraries.bytes))
    load_bytes = inputs.unquantized_weights.total // (world_size if sharded else 1)
    parts.append(Part(f"transformer read from its files ({model.dtype}, x{LOAD_COPIES:g} at the loader's peak)",
                      "host", "load", int(LOAD_COPIES * load_bytes)))
    if inputs.encoders is not None:
        parts.append(Part("encoders (text encoders + VAE)", dev, "encode", inputs.encoders))
        if accelerator:  # loaded on CPU, then moved
            parts.append(Part("encoders while loading", "host", "encode", inputs.encoders))
    weights_name = f"transformer weights ({model.dtype}{', ' + model.quantize if model.quantize else ''}"
    weights_name += f", {offload} blocks offloaded)" if offload else ")"
    for phase in ("train", "validate"):
        parts.append(Part(weights_name, dev, phase, resident))
        if offload:
            parts.append(Part(f"offloaded blocks ({offload}, pinned host memory)", "host", phase, offloaded))
    parts.append(Part(f"adapter ({inputs.adapter_params:,} float32 parameters) + gradients + {train.optimizer} "
                      f"state{' + EMA' if train.ema else ''}", dev, "train", adapter + state))
    ckpt = "with" if model.gradient_checkpointing else "without"
    shape = f"{inputs.tokens.total} tokens x {w.width} x batch {train.batch_size}, {ckpt} checkpointing"
    if accelerator:
        parts.append(Part(f"activations kept for backward ({shape})", dev, "train", kept_bytes(*args)))
        parts.append(Part("backward working set", dev, "train", backward_bytes(*args)))
    else:
        parts.append(Part(f"a step's activations as the CPU allocator holds them ({shape})", dev, "train",
                          cpu_step_bytes(*args)))
        parts.append(Part("the CPU run's own working set (data, autograd engine, threads)", "host", "train",
                          CPU_RUNTIME))
    if config.validation.every and (config.validation.samples or config.validation.from_holdout):
        parts.append(Part("adapter weights", dev, "validate", adapter))
        if inputs.vae is not None:
            parts.append(Part("VAE", dev, "validate", inputs.vae))
        forward = sampling_bytes(inputs.ks, inputs.sample_tokens, w.width, element)
        pixels = min(inputs.sample_pixels, VAE_TILE) if config.validation.vae_tiling else inputs.sample_pixels
        decode = int(VAE_DECODE_FACTOR * pixels * inputs.vae_width * element)
        parts.append(Part("sampling: one denoising forward, or the VAE decode" +
                          (" (tiled)" if config.validation.vae_tiling else ""), dev, "validate", max(forward, decode)))
    notes = []
    if inputs.uncalibrated:
        notes.append(f"no measured activation coefficients for {', '.join(inputs.uncalibrated)}: assumed the "
                     f"largest known; the activations may be overestimated")
    if model.quantize and not w.quantizer_known:
        notes.append(f"quantizer {model.quantize} does not say its sizes: weights counted unquantized")
    if inputs.encoders is None:
        notes.append("the encoders' sizes are not known offline (no local folder): not counted")
    return MemoryPlan(accelerator, parts, notes, offload)


def _offload_count(setting: int | str, weights: TransformerWeights, accelerator: bool) -> int:
    if setting == "auto":  # without an accelerator: every block (offload.resolve_count); with one: fit.py picks
        return len(weights.blocks) if not accelerator else 0
    return int(setting)


# --------------------------------------------------------------------------- gathering


def gather(config: QfluxConfig, registry: Registry, transformer: nn.Module | None = None, references: int = 1,
           libraries: int | None = None) -> Inputs:
    """Build the meta-device transformer (or take ``transformer``), count its weights (quantized by the
    configured quantizer), attach the adapter to a copy to count it, size the tokens from ``data:`` and the
    trainer's condition sizing, and read the encoders' sizes from the model folder."""
    from qflux.run.lora_targets import meta_transformer

    trainer = registry.trainer(config.trainer)
    model = config.model
    if transformer is None:
        transformer = meta_transformer(config, trainer)
        if transformer is None:
            from qflux.errors import UserError

            raise UserError(f"qflux plan cannot build {config.trainer}'s transformer from {model.pretrained} "
                            "offline: give a local diffusers folder (model.pretrained)")
    quantizer = registry.quantizer(model.quantize) if model.quantize else None
    planned = quantizer.planned_bytes(transformer, model) if quantizer is not None else None
    weights = transformer_weights(transformer, model.dtype, planned)
    if quantizer is not None and planned is None:
        weights = TransformerWeights(weights.total, weights.blocks, weights.block_classes, weights.width, 0, False)
    plain = transformer_weights(transformer, model.dtype, None)
    adapter = registry.adapter(model.adapter)
    params = adapter_numel(transformer, adapter, adapter.options_of(model))
    profile = trainer.info.memory
    half = model.dtype != "float32" or config.train.mixed_precision in ("bf16", "fp16")
    ks, missing = coefficients(profile, weights.block_classes, half)
    tokens, sample_tokens, pixels = plan_tokens(config, trainer, references)
    encoders, vae, vae_width = encoder_bytes(config, trainer)
    return Inputs(weights, plain, params, ks, tokens, sample_tokens, pixels, encoders, vae, vae_width,
                  libraries if libraries is not None else library_rss(trainer), missing)


def plan_tokens(config: QfluxConfig, trainer: Trainer, references: int) -> tuple[Tokens, int, int]:
    """Tokens of one training sample at the configured resolution (16 pixels per token side: an 8x VAE and
    2x2 patches, as every supported family packs them), its references sized by the trainer's pipeline rule,
    and the prompt length; and the tokens and pixels of one validation image."""
    from qflux.data.resize import default_size, plan_control, plan_target

    data = config.data
    w, h = default_size(data)
    target = plan_target(w, h, data)
    control = plan_control(w, h, data, target, trainer.info.condition_sizing).size
    per = lambda size: (size[0] // 16) * (size[1] // 16)  # noqa: E731
    profile = trainer.info.memory
    text = config.model.max_sequence_length or (profile.text_tokens if profile else 512)
    tokens = Tokens(per(target.size), references * per(control), text)
    return tokens, tokens.total, target.size[0] * target.size[1]


def encoder_bytes(config: QfluxConfig, trainer: Trainer) -> tuple[int | None, int | None, int]:
    """(encoders incl. the VAE, the VAE alone, the VAE decoder's first width) in ``model.dtype``, from a local
    folder's safetensors headers; None when unknown (a hub id: nothing is downloaded to plan)."""
    import json

    from qflux.model_source import ModelSource
    from qflux.plan.weights import component_bytes

    source = ModelSource.of(config.model)
    if source.is_tiny:  # a few MB, built in code: counted as nothing (planning loads no model, not even these)
        return 0, 0, 32
    if source.path is None or not (source.path / "model_index.json").is_file():
        return None, None, 128
    index = json.loads((source.path / "model_index.json").read_text())
    names = [k for k, v in index.items() if isinstance(v, list) and k not in ("transformer", "scheduler")
             and not k.startswith("tokenizer") and k not in ("processor", "image_processor", "feature_extractor")]
    sizes = {n: component_bytes(source.path, n, config.model.dtype) for n in names}
    total = sum(v for v in sizes.values() if v)
    width = 128
    vae_config = source.path / "vae" / "config.json"
    if vae_config.is_file():
        width = int((json.loads(vae_config.read_text()).get("block_out_channels") or [128])[0])
    return total or None, sizes.get("vae"), width


def library_rss(trainer: Trainer) -> int:
    """This process's resident bytes after importing what a run imports (torch, diffusers and the trainer's
    pipeline, transformers, peft, accelerate): the libraries' share of a run's host RAM."""
    import importlib

    import accelerate  # noqa: F401
    import diffusers
    import peft  # noqa: F401
    import transformers  # noqa: F401

    module, _, name = trainer.info.pipeline.rpartition(".")
    getattr(importlib.import_module(module) if module != "diffusers" else diffusers, name, None)
    return rss_bytes()


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
