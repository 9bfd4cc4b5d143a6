"""The typed config schema (DESIGN section 4). Unknown keys are rejected everywhere (``extra="forbid"``)."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from qflux.config.resolution import Resolution, ResolutionSpec


def _expand_user(value: str) -> str:
    """``~`` / ``~user`` at the start means a home folder, as in a shell (which does not expand it inside quotes
    or after ``=`` in ``--set key=~/x``): without this a literal ``./~/`` folder would appear."""
    return os.path.expanduser(value) if value.startswith("~") else value


# The one rule for every path-valued key (a meta-test checks every key named like a path uses it). Values that
# are not paths (hub ids, ``builtin:...``, ``hf:...``) never start with ``~`` and pass unchanged.
EXPAND_USER = AfterValidator(_expand_user)
PathStr = Annotated[str, EXPAND_USER]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # pissa / olora are left out on purpose: they rewrite the base weights, so the exported LoRA would be wrong
    # on the original model that diffusers and ComfyUI load it onto.
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # DoRA (peft use_dora): a trained per-output-channel magnitude on top of the LoRA; exported in diffusers
    # format (lora_magnitude_vector), which diffusers loads and ComfyUI does not apply as trained (docs/comfyui.md)
    dora: bool = False
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank (peft use_rslora)


class ModelConfig(Section):
    pretrained: PathStr = "builtin:tiny"  # diffusers folder | hub id | builtin:tiny | builtin:shapes-base
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quantize: str | None = None  # a registered quantizer name (qflux-quant: nf4, fp4, int8, fp8)
    # Substrings of quantizable Linear names (inside the blocks, and the input projections) kept in full
    # precision; the timestep/guidance/text embeddings, the final norm and the output projection never are.
    quantize_skip: list[str] = Field(default_factory=list)
    gradient_checkpointing: bool = False
    # repeated transformer blocks whose frozen weights live in host memory, fetched one block ahead (0: off)
    offload_blocks: int | Literal["auto"] = 0
    max_sequence_length: int | None = Field(None, ge=1)  # prompt tokens; None: the trainer's default
    adapter: str = "lora"  # a registered adapter kind (qflux: lora; plugins add others)
    lora: LoraConfig = Field(default_factory=LoraConfig)  # the lora adapter's options
    adapter_options: dict[str, Any] = Field(default_factory=dict)  # another adapter kind's options
    # the trainer's own keys, validated by its ``Trainer.Options`` model in preflight (docs/config.md)
    options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Section):
    path: PathStr = "builtin:shapes"  # folder | .csv/.jsonl manifest | hf:OWNER/NAME[:split] | builtin:shapes[-pink]
    # separate folders (ai-toolkit folder_path + control_path, musubi image/control directories): with
    # control_path set, path is the folder of target images + .txt captions; a list = one folder per control slot
    control_path: PathStr | list[PathStr] | None = None
    mask_path: PathStr | None = None  # a folder of masks named like the targets (any folder layout)
    allow_no_controls: bool = False  # an edit trainer on a dataset without any control image: warn, not refuse
    # samples carry different numbers of control images on purpose (multi-reference models: FLUX.2, Qwen-Edit-Plus):
    # the "fewer controls than most samples" check (a forgotten control file) is off
    mixed_controls: bool = False
    resolution: Resolution = 512  # int = pixel budget of a square (keep aspect); [h, w] = fixed; list = buckets
    resize: Literal["budget", "fixed", "buckets"] | None = None  # None: derived from the resolution's form
    # control (condition) image size: None = what the trainer's pipeline feeds at inference (~1 MP);
    # "target" = the target's planned size (cheaper); int = pixel-budget side (docs/config.md)
    control_resolution: int | Literal["target"] | None = None
    vl_resolution: int | None = None  # Qwen VL encoder's copy of each control: None = the pipeline's; int = budget side
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    # each control (reference) image of a training sample dropped with this probability, independently (all
    # dropped: a text-to-image step), so one LoRA serves none, one or several references; never in validation
    reference_dropout: float = Field(0.0, ge=0.0, le=1.0)
    columns: dict[str, str] = Field(default_factory=dict)  # HF datasets: qflux name -> column name
    holdout: int = Field(0, ge=0)  # samples kept out of training for the validation loss
    max_aspect: float = Field(4.0, gt=1.0)  # longer/shorter side above this is reported as a bad sample
    num_samples: int = Field(24, ge=2)  # builtin:shapes size
    workers: int = Field(0, ge=0)

    @field_validator("resolution")
    @classmethod
    def _sides_multiple_of_16(cls, v: Resolution) -> Resolution:
        for s in (s for hw in ResolutionSpec.parse(v).sizes for s in hw):
            if s < 16 or s % 16:
                nearest = "16" if s < 16 else f"{s // 16 * 16} or {s // 16 * 16 + 16}"
                raise ValueError(f"sides are multiples of 16 (at least 16): {s} is not, use {nearest}")
        return v

    @property
    def resolution_spec(self) -> ResolutionSpec:
        """``resolution`` with ``resize``, parsed (mode, sizes, nominal area, default size); the raw value stays
        ``resolution`` (cache keys and config.yaml use it)."""
        return ResolutionSpec.parse(self.resolution, self.resize)

    @field_validator("control_resolution", "vl_resolution")
    @classmethod
    def _budget_side(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and (v < 16 or v % 16):
            nearest = "16" if v < 16 else f"{v // 16 * 16} or {v // 16 * 16 + 16}"
            raise ValueError(f"a pixel-budget side is a multiple of 16 (at least 16): {v} is not, use {nearest}")
        return v


class CacheConfig(Section):
    enabled: bool = True
    dir: PathStr = ".qflux-cache"


class EmaConfig(Section):
    """``train.ema``: an exponential moving average of the adapter's weights (``qflux.training.ema``)."""

    decay: float = Field(0.999, gt=0, lt=1)  # per update: shadow = decay * shadow + (1 - decay) * weights
    every: int = Field(1, ge=1)  # update at the steps that are multiples of this
    start: int = Field(0, ge=0)  # the first update at or after this step copies the weights
    use_for: list[Literal["validation", "export"]] = Field(default_factory=lambda: ["validation", "export"])


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1.0e-4, gt=0)
    optimizer: str = "adamw"  # adamw | adamw8bit | prodigy | adamw_schedulefree | adafactor | "pkg.module.Class"
    optimizer_args: dict[str, object] = Field(default_factory=dict)
    weight_decay: float = Field(1.0e-4, ge=0)
    scheduler: str = "constant"  # diffusers.optimization.get_scheduler names
    warmup_steps: int = Field(0, ge=0)
    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid", "shift", "resolution_shift"] = "logit_normal"
    logit_mean: float = 0.0  # sigma = sigmoid(mean + std n): positive = more noise (diffusers' scripts: the opposite)
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(3.0, gt=0)  # for "shift"; "resolution_shift" derives it from the token count
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    save_every: int = Field(250, ge=0)  # 0 = only the final export
    keep_checkpoints: int = Field(3, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every: int = Field(1, ge=1)
    fsdp: bool = False  # with several processes: shard the frozen base (torch FSDP2), keep the LoRA replicated
    collective_timeout: float = Field(10.0, gt=0)  # minutes a collective waits for a dead/stuck rank (not 30)
    ema: EmaConfig | None = None  # None: no EMA
    # torch.compile the transformer block by block (regional: one compile per block type), eager where unavailable
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (torch._dynamo.list_backends(); aot_eager: debugging)

    @field_validator("timestep_sampling", mode="before")
    @classmethod
    def _flux_shift_alias(cls, v: object) -> object:
        # the old name: it was FLUX's constants for every model; now each model's scheduler config gives them
        return "resolution_shift" if v == "flux_shift" else v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, v: object) -> object:
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` (also in --set) as false


class MaskWeighting(Section):
    foreground: float = Field(2.0, ge=0)
    background: float = Field(1.0, ge=0)


class LossConfig(Section):
    mask_weighting: MaskWeighting = Field(default_factory=MaskWeighting)


class ValidationSample(Section):
    control: list[PathStr] = Field(default_factory=list)
    prompt: str
    target: PathStr | None = None  # optional: shown in the grid
    negative_prompt: str = ""


class ValidationConfig(Section):
    every: int = Field(100, ge=0)  # 0 = off
    steps: int = Field(20, ge=1)
    seed: int = 0
    true_cfg: float = 1.0
    samples: list[ValidationSample] = Field(default_factory=list)
    from_holdout: int = Field(0, ge=0)  # also sample this many held-out data samples
    # export the LoRA of the validation step best on this metric to output.dir/best (qflux.training.best)
    select_best: Literal["val_loss", "val_shift_px", "val_zoom", "val_unedited_psnr"] | None = None
    vae_tiling: bool = False  # decode validation images (and qflux sample's) in VAE tiles / slices


class OutputConfig(Section):
    dir: PathStr = "runs/my_run"


class QfluxConfig(Section):
    trainer: str = "kontext"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
