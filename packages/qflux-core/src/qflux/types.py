"""Typed data that crosses the boundary between the core and a plugin's ``Trainer``.

Shapes use: B batch, N target tokens, Nc control tokens, C packed channels (latent channels x 4 for the
2x2 packing), L prompt tokens, D prompt width. A token grid ``(h, w)`` is the latent grid halved by the
packing, i.e. ``(H / 16, W / 16)`` for an image of ``H x W`` pixels and a VAE factor of 8.

Nothing here imports torch at module import so that ``qflux plugins list`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

    from qflux.config.schema import ModelConfig
    from qflux.trainer import Trainer

Grid = tuple[int, int]


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class ConditionSizing:
    """The size the trainer's diffusers pipeline gives a condition (control) image at inference, as data.

    A LoRA is used through that pipeline, so by default (``data.control_resolution: null``) training feeds
    conditions of the same size; ``qflux.data.resize.condition_size`` applies the rule. The pipeline looks at
    the aspect ``r = w / h`` of the image it is given (after flooring its sides to ``input_multiple``) and

    - with ``preferred`` sizes: takes the ``(w, h)`` whose ``w / h`` is closest to ``r`` (absolute difference,
      ties to the smaller ``(w, h)``): FluxKontextPipeline's ``PREFERRED_KONTEXT_RESOLUTIONS`` snap;
    - with ``shrink_only``: only shrinks an image of more than ``area`` pixels, to about ``area`` at its
      aspect (sides truncated: ``int(w * s)``, ``int(h * s)`` with ``s = sqrt(area / (w * h))``), never
      enlarges a smaller one, then floors both sides to ``multiple`` by a centre crop: the FLUX.2 pipelines'
      ``_resize_to_target_area`` and ``preprocess(..., resize_mode="crop")``. It reads the image's own size
      (``input_multiple`` must stay 1, ``preferred`` empty);
    - otherwise: ``w = sqrt(area * r)``, ``h = w / r``, each rounded (half to even) to ``multiple``: the
      qwenimage pipelines' ``calculate_dimensions(area, r)``.

    ``vl_area``: the area of the separate copy a vision-language prompt encoder sees
    (``calculate_dimensions(vl_area, r)``); None: the VL encoder, if any, sees the condition image itself.
    """

    area: int = 1024 * 1024
    multiple: int = 32
    preferred: tuple[tuple[int, int], ...] = ()  # (w, h)
    input_multiple: int = 1
    vl_area: int | None = None
    shrink_only: bool = False

    def __post_init__(self) -> None:
        if self.shrink_only and (self.preferred or self.input_multiple != 1):
            raise ValueError("ConditionSizing: shrink_only takes no preferred sizes and no input_multiple")


@dataclass(frozen=True)
class MemoryProfile:
    """What ``qflux plan`` needs to know of a trainer's model beyond its weights (``TrainerInfo.memory``).

    ``activations``: per repeated-block class (its ``__name__``), the bytes autograd keeps for backward per
    token, per unit of the block's width and per byte of the activation dtype. Measured, not derived: a real
    step of the trainer's ``builtin:tiny`` model under ``qflux.plan.probe.SavedBytesProbe``
    (``benchmarks/calibrate_activations.py`` prints them; tests/plan checks the declared ones against a step).
    ``text_tokens``: the prompt length the transformer sees when ``model.max_sequence_length`` is not set.
    """

    activations: tuple[tuple[str, float], ...] = ()
    text_tokens: int = 512
    # the same for a half-precision base (``model.dtype`` bfloat16/float16, or mixed precision) under the float32
    # adapter, per byte of the half dtype: peft casts each adapted layer's input to float32 and keeps that copy,
    # so these are ~1.6x the float32 ones; empty: the float32 coefficients are used
    half: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TrainerInfo:
    """What the core needs to know of a trainer without loading anything (``Trainer.info``)."""

    name: str  # the value of the config key ``trainer``
    family: str  # model family, e.g. "flux-kontext"; a LoRA trained for one family fits no other
    description: str
    pipeline: str  # import path of the diffusers pipeline used for sampling and LoRA export
    default_model: str = ""  # hub id of the real model this trainer targets
    max_controls: int = 1  # how many control images one sample may carry
    # an edit trainer: a dataset in which no sample has a control image is refused (a misnamed control folder
    # would silently train text-to-image) unless data.allow_no_controls; False: a text-to-image trainer
    needs_controls: bool = True
    # how the pipeline sizes condition images at inference; None: unknown, conditions get the target's size
    condition_sizing: ConditionSizing | None = None
    # the trainer's prompt encoding depends on the control images (a vision-language encoder, as Qwen-Image-Edit's):
    # reference dropout (data.reference_dropout) then needs the prompt encoded with every subset of the controls
    # (``EncodedSample.subset_prompts``, made by the core through ``Trainer.encode``)
    prompt_sees_controls: bool = False
    # activation coefficients and prompt length for ``qflux plan``; None: the planner's conservative defaults
    memory: MemoryProfile | None = None


@dataclass(frozen=True)
class QuantizerInfo:
    """What the core knows of a quantization backend (``Quantizer.info``)."""

    name: str  # the value of the config key ``model.quantize``
    description: str
    requires: tuple[str, ...] = ()  # pip distributions the backend needs at run time


# --------------------------------------------------------------------------- data


@dataclass
class EditSample:
    """One example after loading and resizing, before encoding.

    ``target`` is None for inference requests; ``controls`` is empty for a text-to-image sample.
    Image sides are multiples of 16. ``mask`` (mode "L", white = edited) has the target's size.
    """

    key: str
    prompt: str
    target: Image | None
    controls: list[Image] = field(default_factory=list)
    mask: Image | None = None
    files: tuple[Path, ...] = ()  # the files it came from: error messages and cache keys
    # the copy of each control a vision-language prompt encoder sees when the pipeline sizes it apart
    # (``ConditionSizing.vl_area`` / ``data.vl_resolution``); empty: the VL encoder sees ``controls``
    vl_controls: list[Image] = field(default_factory=list)


@dataclass
class PromptEmbeds:
    """Prompt encoding. Per sample: hidden [L, D], mask [L], pooled [P], image_slots [L]; batched: a leading B."""

    hidden: torch.Tensor
    mask: torch.Tensor | None = None  # 1 = real token, 0 = padding
    pooled: torch.Tensor | None = None
    # [L] bool: the positions a vision-language encoder reserved for image tokens, which a transformer that
    # interleaves images into the text stream fills with the images' latents (Qwen-Image 2.1); None: no such slots
    image_slots: torch.Tensor | None = None

    def with_rows(self, take: Any) -> PromptEmbeds:
        """The same fields with ``take(tensor)`` applied to each one present (row selection, moves, casts of
        ``hidden`` / ``pooled`` are the caller's ``take``)."""
        return PromptEmbeds(hidden=take(self.hidden), mask=None if self.mask is None else take(self.mask),
                            pooled=None if self.pooled is None else take(self.pooled),
                            image_slots=None if self.image_slots is None else take(self.image_slots))


@dataclass
class EncodedSample:
    """Everything the training step needs from one example: the part the embedding cache stores."""

    key: str
    latents: torch.Tensor  # [N, C] packed, normalised target latents
    grid: Grid  # token grid of the target
    prompt: PromptEmbeds
    controls: list[torch.Tensor] = field(default_factory=list)  # each [Nc_i, C], clean
    control_grids: list[Grid] = field(default_factory=list)
    mask: torch.Tensor | None = None  # [N] token-space edit mask in [0, 1]
    empty_prompt: PromptEmbeds | None = None  # encoding of "" (with the controls), for caption dropout
    # Reference dropout (``data.reference_dropout``) for a trainer whose prompt encoding sees the controls (a
    # vision-language encoder, as Qwen-Image-Edit's): the prompt encoded with only some of the controls, keyed
    # by the kept control indices joined with "," ("" = none kept, "0,2" = controls 0 and 2; the full set may be
    # left out, it is ``prompt``). A sample whose references are dropped takes its prompt from here, so it never
    # trains on a prompt that describes images it no longer carries; a dict without the drawn subset is a
    # trainer bug and stops the step. None: the prompt does not depend on the controls (a text-only encoder,
    # FLUX.1 Kontext, FLUX.2) and is kept. ``subset_empty_prompts``: the same for ``empty_prompt``.
    subset_prompts: dict[str, PromptEmbeds] | None = None
    subset_empty_prompts: dict[str, PromptEmbeds] | None = None

    @property
    def signature(self) -> tuple[Grid, tuple[Grid, ...]]:
        """(target grid, control grids): the batch sampler buckets by the target grid (samples of one target
        grid stack without padding of image tokens); the control layout groups a batch's forwards."""
        return self.grid, tuple(self.control_grids)


@dataclass
class Batch:
    """Samples of one target grid stacked along B (see ``qflux.training.batching.collate``).

    Uniform (every sample of one control layout, the usual case): ``controls`` holds each control stacked
    [B, Nc_i, C]. Mixed (samples with different control counts or sizes, e.g. under reference dropout): the
    diffusers transformers take one set of image position ids per batch, so such a batch cannot go through one
    forward; it keeps each sample's controls in ``sample_controls`` / ``sample_control_grids`` with
    ``controls`` / ``control_grids`` empty, and ``layout_groups`` splits it into uniform sub-batches, one
    forward each (``qflux.training.step.predict``). ``Trainer.predict`` only ever gets uniform batches.
    """

    keys: list[str]
    latents: torch.Tensor  # [B, N, C]
    grid: Grid
    prompt: PromptEmbeds  # hidden [B, L, D] padded to the longest, mask [B, L]
    controls: list[torch.Tensor] = field(default_factory=list)  # each [B, Nc_i, C]
    control_grids: list[Grid] = field(default_factory=list)
    mask: torch.Tensor | None = None  # [B, N]
    masked: torch.Tensor | None = None  # [B] bool when only some samples carry a mask (the others weigh 1)
    sample_controls: list[list[torch.Tensor]] | None = None  # mixed batch: per sample, each [Nc_i, C]
    sample_control_grids: list[list[Grid]] | None = None  # mixed batch: per sample

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    @property
    def mixed(self) -> bool:
        """Whether the samples differ in control layout (``sample_controls`` set)."""
        return self.sample_controls is not None

    def layout_groups(self) -> list[tuple[list[int], Batch]]:
        """The uniform sub-batches, each with the indices of its samples in this batch, in order of first
        appearance; a uniform batch is one group, ``[(all indices, self)]``, without a copy."""
        per_sample, per_sample_grids = self.sample_controls, self.sample_control_grids
        if per_sample is None or per_sample_grids is None:
            return [(list(range(self.size)), self)]
        groups: dict[tuple[Grid, ...], list[int]] = {}
        for i, grids in enumerate(per_sample_grids):
            groups.setdefault(tuple((g[0], g[1]) for g in grids), []).append(i)
        return [(indices, self._rows(indices, per_sample, per_sample_grids[indices[0]]))
                for indices in groups.values()]

    def _rows(self, indices: list[int], per_sample: list[list[torch.Tensor]], grids: list[Grid]) -> Batch:
        """The samples ``indices`` of a mixed batch, all of the control layout ``grids``, as a uniform batch."""
        import torch

        index = torch.tensor(indices, device=self.latents.device)

        def pick(t: Any) -> Any:
            return None if t is None else t.index_select(0, index.to(t.device))

        return Batch(
            keys=[self.keys[i] for i in indices],
            latents=pick(self.latents),
            grid=self.grid,
            prompt=self._prompt_rows(index),
            controls=[torch.stack([per_sample[i][j] for i in indices]) for j in range(len(grids))],
            control_grids=list(grids),
            mask=pick(self.mask),
            masked=pick(self.masked),
        )

    def _prompt_rows(self, index: torch.Tensor) -> PromptEmbeds:
        """The prompts of rows ``index``, cut to the longest of them: the padding only other rows needed would
        cost compute and make the group's forward differ from the one ``collate`` of its samples gives."""
        import torch

        p = self.prompt
        rows = p.with_rows(lambda t: t.index_select(0, index.to(t.device)))
        if rows.mask is None:
            return rows
        mask = rows.mask
        used = (mask != 0).any(dim=0).long() * torch.arange(1, mask.shape[1] + 1, device=mask.device)
        length = int(used.max()) or mask.shape[1]  # the last column any row uses (an all-zero mask: keep all)
        return PromptEmbeds(hidden=rows.hidden[:, :length].contiguous(), mask=mask[:, :length].contiguous(),
                            pooled=rows.pooled,
                            image_slots=None if rows.image_slots is None else rows.image_slots[:, :length].contiguous())

    def to(self, device: Any, dtype: Any = None) -> Batch:
        """Move every tensor; floating tensors are cast to ``dtype`` when given (masks stay as they are)."""

        def move(t: Any, cast: bool = True) -> Any:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (cast and dtype is not None and t.is_floating_point()) else t.dtype)

        return Batch(
            keys=self.keys,
            latents=move(self.latents),
            grid=self.grid,
            prompt=PromptEmbeds(
                hidden=move(self.prompt.hidden), mask=move(self.prompt.mask, cast=False), pooled=move(self.prompt.pooled),
                image_slots=move(self.prompt.image_slots, cast=False),
            ),
            controls=[move(c) for c in self.controls],
            control_grids=self.control_grids,
            mask=move(self.mask, cast=False),
            masked=move(self.masked, cast=False),
            sample_controls=None if self.sample_controls is None else [
                [move(c) for c in controls] for controls in self.sample_controls],
            sample_control_grids=self.sample_control_grids,
        )


@dataclass
class NoisyInput:
    """The noised target the transformer sees in one step."""

    latents: torch.Tensor  # [B, N, C]  x_t = (1 - sigma) x0 + sigma * noise
    sigmas: torch.Tensor  # [B] in (0, 1)
    target: torch.Tensor  # [B, N, C]  velocity target noise - x0


# --------------------------------------------------------------------------- models and sampling


@dataclass
class ModelBundle:
    """The loaded models of a run (``qflux.run.models``). ``encoders`` is what ``Trainer.load_encoders``
    returned (None when not loaded); ``Trainer.sample`` may load and set it."""

    trainer: Trainer
    model: ModelConfig  # the config it was loaded with
    transformer: torch.nn.Module
    encoders: Any = None


@dataclass
class SampleRequest:
    """One validation or inference image to generate."""

    prompt: str
    controls: list[Image] = field(default_factory=list)
    height: int = 512
    width: int = 512
    steps: int = 20
    seed: int = 0
    guidance: float | None = None  # a guidance-distilled model's guidance value; None: the trainer's default
    true_cfg: float = 1.0  # > 1 runs classifier-free guidance with ``negative_prompt``
    negative_prompt: str = ""
    vl_controls: list[Image] = field(default_factory=list)  # as ``EditSample.vl_controls``

