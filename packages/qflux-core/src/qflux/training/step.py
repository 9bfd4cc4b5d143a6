"""One training forward: noise the target, ``Trainer.predict`` (once per control layout), the ``qflux_loss``
hook; caption and reference dropout drawn per sample."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from qflux.config.schema import QfluxConfig
from qflux.trainer import Trainer
from qflux.training.batching import collate
from qflux.training.timesteps import ShiftConstants, add_noise, sample_sigmas
from qflux.types import Batch, EncodedSample, NoisyInput, PromptEmbeds

VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def loss_of(hook: Any, prediction: torch.Tensor, noisy: NoisyInput, batch: Batch, config: QfluxConfig) -> torch.Tensor:
    return hook.qflux_loss(prediction=prediction, noisy=noisy, batch=batch, loss=config.loss)


def sample_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """The random stream of one sample in one epoch (caption dropout, reference dropout, sigma, noise).

    A function of (seed, epoch, sample) only: the same sample gets the same noise whatever the batch size,
    the process count or an interruption, so 2 processes x batch 1 equal 1 process x batch 2 and a resumed
    run equals an uninterrupted one without saving RNG state.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def caption_dropout_draws(p: float, generators: list[torch.Generator]) -> list[bool]:
    """Whether each sample trains with its empty prompt: one draw from its own stream, none when ``p`` is 0."""
    if p <= 0:
        return [False] * len(generators)
    return [float(torch.rand((), generator=g)) < p for g in generators]


def with_empty_prompt(sample: EncodedSample) -> EncodedSample:
    """The sample with its empty-prompt encoding as prompt (unchanged when none was encoded)."""
    return replace(sample, prompt=sample.empty_prompt) if sample.empty_prompt is not None else sample


def apply_caption_dropout(samples: list[EncodedSample], p: float,
                          generators: list[torch.Generator]) -> list[EncodedSample]:
    """Swap each sample's prompt for its empty-prompt encoding with probability ``p`` (its own stream)."""
    drops = caption_dropout_draws(p, generators)
    return [with_empty_prompt(s) if drop else s for s, drop in zip(samples, drops)]


def reference_dropout_draws(samples: list[EncodedSample], p: float,
                            generators: list[torch.Generator]) -> list[list[int]]:
    """The indices of the controls each sample keeps: each is dropped with probability ``p``, independently
    (one draw per control from the sample's own stream; none at all when ``p`` is 0, so runs without reference
    dropout keep their streams, hence their sigmas and noise, bitwise)."""
    if p <= 0:
        return [list(range(len(s.controls))) for s in samples]
    kept = []
    for s, g in zip(samples, generators):
        drawn = torch.rand(len(s.controls), generator=g).tolist() if s.controls else []
        kept.append([i for i, u in enumerate(drawn) if u >= p])
    return kept


def subset_prompt(sample: EncodedSample, prompts: dict[str, PromptEmbeds] | None, subset: str,
                  fallback: PromptEmbeds | None) -> PromptEmbeds | None:
    """The prompt encoded with the kept controls ``subset`` (``EncodedSample.subset_prompts``); ``fallback``
    when the trainer encodes none (its prompt does not depend on the controls)."""
    if prompts is None:
        return fallback
    if subset not in prompts:
        raise ValueError(f"sample {sample.key}: its trainer encoded prompts for the control subsets "
                         f"{sorted(prompts)} but not for {subset!r} (the controls reference dropout kept); "
                         "an encoding with subset prompts must cover every proper subset of its controls")
    return prompts[subset]


def keep_references(sample: EncodedSample, kept: list[int]) -> EncodedSample:
    """The sample with only the controls ``kept`` (all of them: the sample itself). Its prompt and empty
    prompt come from the subset encodings when the trainer made them; the subset dicts are dropped, their
    keys name the original controls."""
    if len(kept) == len(sample.controls):
        return sample
    subset = ",".join(str(i) for i in kept)
    return replace(sample, controls=[sample.controls[i] for i in kept],
                   control_grids=[sample.control_grids[i] for i in kept],
                   prompt=subset_prompt(sample, sample.subset_prompts, subset, sample.prompt),
                   empty_prompt=subset_prompt(sample, sample.subset_empty_prompts, subset, sample.empty_prompt),
                   subset_prompts=None, subset_empty_prompts=None)


def apply_dropout(samples: list[EncodedSample], caption: float, reference: float,
                  generators: list[torch.Generator]) -> list[EncodedSample]:
    """Caption and reference dropout (``data.caption_dropout``, ``data.reference_dropout``) of training samples.

    Drawn in this order from each sample's stream: the caption's draw, then one per control, so switching
    reference dropout on changes no sample's caption decision. Applied in the other order: the controls are cut
    first (prompt and empty prompt become those encoded with the kept controls, when the trainer encodes
    per-subset prompts), then a dropped caption takes that empty prompt: a sample that loses both trains on
    the empty prompt of the kept controls, as a sample that never had the others would."""
    captions = caption_dropout_draws(caption, generators)
    kept = reference_dropout_draws(samples, reference, generators)
    out = []
    for s, drop_caption, keep in zip(samples, captions, kept):
        s = keep_references(s, keep)
        out.append(with_empty_prompt(s) if drop_caption else s)
    return out


def make_batch(samples: list[EncodedSample], config: QfluxConfig, epoch: int, device: Any,
               dtype: torch.dtype) -> tuple[Batch, list[torch.Generator]]:
    """The micro-batch on the device and its samples' random streams (dropout already drawn from them).
    Training only: validation and the held-out loss never drop captions or references."""
    generators = [sample_generator(config.train.seed, epoch, s.key) for s in samples]
    samples = apply_dropout(samples, config.data.caption_dropout, config.data.reference_dropout, generators)
    return collate(samples).to(device, dtype), generators


def noisy_rows(noisy: NoisyInput, indices: list[int]) -> NoisyInput:
    """The rows ``indices`` of a noised batch."""
    index = torch.tensor(indices, device=noisy.latents.device)
    return NoisyInput(latents=noisy.latents.index_select(0, index),
                      sigmas=noisy.sigmas.index_select(0, index.to(noisy.sigmas.device)),
                      target=noisy.target.index_select(0, index.to(noisy.target.device)))


def layout_count(batch: Batch) -> int:
    """How many forwards ``predict`` makes for ``batch``: one per control layout (without building them)."""
    if batch.sample_control_grids is None:
        return 1
    return len({tuple((g[0], g[1]) for g in grids) for grids in batch.sample_control_grids})


def first_sample(batch: Batch) -> Batch:
    """Sample 0 of a uniform batch as a batch of one (its prompt keeps the batch's padding)."""
    prompt = batch.prompt

    def head(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:1]

    return replace(batch, keys=batch.keys[:1], latents=batch.latents[:1], controls=[c[:1] for c in batch.controls],
                   prompt=prompt.with_rows(lambda t: t[:1]),
                   mask=head(batch.mask), masked=head(batch.masked))


def predict(trainer: Trainer, transformer: torch.nn.Module, batch: Batch, noisy: NoisyInput, model: Any,
            forwards: int = 1) -> torch.Tensor:
    """The predicted velocity of the whole batch, [B, N, C] in batch order.

    A uniform batch: ``Trainer.predict`` once, exactly. A mixed batch (``Batch.layout_groups``): once per control
    layout on that group's rows (the transformers take one set of image position ids per forward), the rows
    put back in batch order. ``forwards``: at least that many forwards are made, the extra ones repeating sample
    0 with weight 0 in the result (its backward runs, its gradient is zero): under FSDP every forward and its
    backward are collectives, so all processes must make the same count (``micro_step`` agrees on it)."""
    groups = batch.layout_groups()
    if len(groups) == 1:
        prediction = trainer.predict(transformer, batch, noisy, model)
    else:
        parts = [trainer.predict(transformer, sub, noisy_rows(noisy, indices), model) for indices, sub in groups]
        order = torch.tensor([i for indices, _ in groups for i in indices])
        prediction = torch.cat(parts).index_select(0, torch.argsort(order).to(parts[0].device))
    indices, sub = groups[0]
    for _ in range(forwards - len(groups)):
        extra = trainer.predict(transformer, first_sample(sub), noisy_rows(noisy, indices[:1]), model)
        prediction = prediction + (extra.sum() * 0.0).nan_to_num(0.0, 0.0, 0.0)
    return prediction


def agreed_forwards(accelerator: Any, batch: Batch) -> int:
    """The most forwards any process makes for its micro-batch (``predict``), agreed by all of them."""
    if accelerator.num_processes <= 1:
        return 1
    count = torch.tensor([layout_count(batch)], device=batch.latents.device)
    return int(accelerator.gather(count).max())


def training_loss(hook: Any, trainer: Trainer, transformer: torch.nn.Module, batch: Batch,
                  config: QfluxConfig, generators: list[torch.Generator],
                  shift: ShiftConstants | None = None, forwards: int = 1) -> torch.Tensor:
    """Loss of one micro-batch (already on the device); ``generators[i]`` (CPU) draws sample i's sigma and
    noise, so a run is reproducible whatever the device. ``shift``: the model's constants for
    ``timestep_sampling: resolution_shift`` (read once per run, ``shift_source.model_shift``). ``forwards``: the
    least number of transformer forwards (``predict``). The loss hook sees the whole batch, mixed or not."""
    latents = batch.latents
    num_tokens = latents.shape[1]
    sigmas = torch.cat([sample_sigmas(1, num_tokens, config.train, g, shift) for g in generators]).to(latents.device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    noisy = add_noise(latents, sigmas, noise.to(latents.device, latents.dtype))
    return loss_of(hook, predict(trainer, transformer, batch, noisy, config.model, forwards), noisy, batch, config)


@torch.no_grad()
def validation_loss_sum(hook: Any, trainer: Trainer, transformer: torch.nn.Module, batches: list[Batch],
                        config: QfluxConfig, seed: int) -> tuple[float, int]:
    """(sum of losses, count) over held-out batches at fixed sigmas with fixed per-sample noise: the mean is
    comparable between steps and does not depend on how batches are split across processes."""
    total, count = 0.0, 0
    for batch in batches:
        latents = batch.latents
        generators = [sample_generator(seed, -1, key) for key in batch.keys]
        for sigma in VALIDATION_SIGMAS:
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
            sigmas = torch.full((latents.shape[0],), sigma, device=latents.device)
            noisy = add_noise(latents, sigmas, noise.to(latents.device, latents.dtype))
            loss = loss_of(hook, predict(trainer, transformer, batch, noisy, config.model), noisy, batch, config)
            total += float(loss) * latents.shape[0]
            count += latents.shape[0]
    return total, count


def micro_step(accelerator: Any, hook: Any, trainer: Trainer, transformer: torch.nn.Module, batch: Batch,
               config: QfluxConfig, generators: list[torch.Generator], params: list[torch.nn.Parameter],
               optimizer: torch.optim.Optimizer,
               grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
               loss_scale: float = 1.0, shift: ShiftConstants | None = None) -> float:
    """One micro-batch of the training loop: loss, backward, and (when the accumulation is complete)
    clipping and the optimizer step. Returns the loss; a non-finite loss is returned before any backward
    or step, so the caller can stop with the weights untouched. ``grad_sync`` averages the gradients across
    processes when no DDP wrapper does (``train.fsdp``), once per optimizer step, before clipping.
    ``loss_scale`` weighs this process's share of a short global batch (``batching.rank_batches``); the
    returned loss is the unscaled mean of the micro-batch. With several processes they first agree on the
    number of forwards (a mixed batch makes one per control layout, ``agreed_forwards``)."""
    forwards = agreed_forwards(accelerator, batch)
    with accelerator.accumulate(transformer), accelerator.autocast():
        loss = training_loss(hook, trainer, transformer, batch, config, generators, shift, forwards)
        value = float(loss.detach())
        if accelerator.num_processes > 1:  # every rank must agree before the backward's all-reduce
            bad = accelerator.reduce(torch.tensor([0.0 if math.isfinite(value) else 1.0], device=loss.device),
                                     reduction="sum")
            if float(bad) > 0:
                return math.nan if math.isfinite(value) else value
        if not math.isfinite(value):
            return value
        accelerator.backward(loss if loss_scale == 1.0 else loss * loss_scale)
        if accelerator.sync_gradients and grad_sync is not None:
            grad_sync(params)
        if accelerator.sync_gradients and config.train.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return value
