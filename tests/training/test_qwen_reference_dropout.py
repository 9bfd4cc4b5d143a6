"""Reference dropout on the Qwen-Image-Edit trainers (``data.reference_dropout``), whose Qwen2.5-VL prompt encoder
sees the control images (``TrainerInfo.prompt_sees_controls``):

- encoding a sample with k controls also encodes the prompt (and the empty prompt, with caption dropout) of each
  proper subset of them (``EncodedSample.subset_prompts``), exactly as the same sample with only those controls
  encodes on its own; nothing of the kind without reference dropout, nor for a trainer whose prompt is text-only;
- a training run feeds each sample the prompt of the controls it kept (a sample left without controls trains on
  its "" subset prompt, not its full one), reads those prompts back from the embedding cache, and a resume from
  the cache reproduces the losses;
- the cache key follows whether subset prompts are encoded (p = 0 vs p > 0), not the value of p.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from qflux.cache import entry_key
from qflux.config import load_config
from qflux.config.schema import QfluxConfig
from qflux.data import open_records
from qflux.plugins import build_registry
from qflux.run.cache import build_cache, open_cache
from qflux.run.train import train
from qflux.testing import single_torch_thread, spied_registry, tiny_config, write_config
from qflux.training.encoding import LazyEncoders, encode_records
from qflux.types import EncodedSample, PromptEmbeds

PLUS = "qwen-edit-plus"
# control i of every sample: its size (w, h). Distinct aspects give distinct control grids ((2, 2) and (1, 3) at
# the target's 32 x 32 area), so a batch's controls say which ones a sample kept
CONTROL_SIZES = [(32, 32), (64, 32)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box they lose a lot."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def registry():
    return build_registry()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def make_folder(root: Path, samples: dict[str, list[int]]) -> Path:
    """The qflux folder layout; ``samples``: stem -> which of the controls ``CONTROL_SIZES`` it carries, in
    order (the same stem, target, prompt and control images whatever subset a folder gives it)."""
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for n, stem in enumerate(samples):
        seed = 100 * (int(stem[1:]) + 1)
        noise_image(32, 32, seed).save(root / "training_images" / f"{stem}.png")
        (root / "training_images" / f"{stem}.txt").write_text(f"put the shape of picture 2 into picture 1, {n}")
        for j, control in enumerate(samples[stem]):
            name = stem if j == 0 else f"{stem}_control_{j}"
            noise_image(*CONTROL_SIZES[control], seed=seed + control + 1).save(root / "control_images" / f"{name}.png")
    return root


def qwen_config(tmp_path: Path, folder: Path, data: dict | None = None, **sections) -> QfluxConfig:
    # vl_resolution 48: the VL encoder's copies differ from the controls (32 px side), so a subset must carry the
    # matching vl_controls too; small enough to keep the tiny VL encoder fast
    data = {"path": str(folder), "resolution": 32, "holdout": 0, "vl_resolution": 48, **(data or {})}
    return load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, PLUS, data=data, **sections)))


def same(a: PromptEmbeds | None, b: PromptEmbeds | None) -> bool:
    if a is None or b is None:
        return a is b
    parts = [(a.hidden, b.hidden), (a.mask, b.mask), (a.pooled, b.pooled)]
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in parts)


# --------------------------------------------------------------------------- encoding


def test_the_qwen_trainers_say_their_prompt_sees_the_controls(registry):
    for name in ("qwen-edit", "qwen-edit-plus", "qwen-edit-2511"):
        assert registry.trainer(name).info.prompt_sees_controls
    assert not registry.trainer("kontext").info.prompt_sees_controls


@pytest.mark.parametrize("caption_dropout", [0.0, 0.5], ids=["no-caption-dropout", "caption-dropout"])
def test_subset_prompts_equal_the_sample_encoded_with_only_those_controls(tmp_path, registry, caption_dropout):
    trainer = registry.trainer(PLUS)
    encoders: LazyEncoders | None = None

    def encoded(name: str, controls: list[int], reference_dropout: float) -> EncodedSample:
        nonlocal encoders
        config = qwen_config(tmp_path / name, make_folder(tmp_path / name / "data", {"s0": controls}),
                             data={"caption_dropout": caption_dropout, "reference_dropout": reference_dropout,
                                   "allow_no_controls": True})
        encoders = encoders or LazyEncoders(trainer, config)  # one load: the model section is the same
        records = open_records(config.data)
        assert len(records) == 1 and len(records[0].controls) == len(controls)
        return encode_records(records, trainer, encoders, config)[0]

    sample = encoded("full", [0, 1], 0.4)
    assert sample.subset_prompts is not None and list(sample.subset_prompts) == ["", "0", "1"]
    if caption_dropout:
        assert sample.subset_empty_prompts is not None and list(sample.subset_empty_prompts) == ["", "0", "1"]
    else:
        assert sample.subset_empty_prompts is None
    for key, controls in {"": [], "0": [0], "1": [1]}.items():
        alone = encoded(f"only-{key or 'none'}", controls, 0.0)  # the same sample, only those controls
        assert alone.subset_prompts is None and alone.subset_empty_prompts is None  # p = 0: none encoded
        assert same(sample.subset_prompts[key], alone.prompt), key
        if caption_dropout:
            assert same(sample.subset_empty_prompts[key], alone.empty_prompt), key
        assert not same(sample.subset_prompts[key], sample.prompt), key  # the VL encoder saw other images
    # the sample itself is encoded as without reference dropout
    plain = encoded("plain", [0, 1], 0.0)
    assert plain.subset_prompts is None and plain.subset_empty_prompts is None
    assert same(plain.prompt, sample.prompt) and same(plain.empty_prompt, sample.empty_prompt)
    assert all(torch.equal(a, b) for a, b in zip(plain.controls, sample.controls))


def test_a_trainer_whose_prompt_does_not_see_the_controls_encodes_no_subsets(tmp_path, registry):
    trainer = registry.trainer("kontext")
    folder = make_folder(tmp_path / "data", {"s0": [0]})
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, "kontext", data={"path": str(folder), "holdout": 0, "reference_dropout": 0.5})))
    sample = encode_records(open_records(config.data), trainer, LazyEncoders(trainer, config), config)[0]
    assert sample.subset_prompts is None and sample.subset_empty_prompts is None


# --------------------------------------------------------------------------- training


class PromptSpy:
    """Records each forward's keys, controls and per-row prompt (its padding cut off); ``encode`` counts the
    samples that reach the trainer's encoder."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []
        self.encoded = 0

    def encode(self, inner, encoders, samples, model, empty_prompt):
        self.encoded += len(samples)
        return inner(encoders, samples, model, empty_prompt)

    def predict(self, inner, transformer, batch, noisy, model):
        for i, key in enumerate(batch.keys):
            hidden = batch.prompt.hidden[i]
            if batch.prompt.mask is not None:
                hidden = hidden[batch.prompt.mask[i].bool()]
            self.rows.append((key, [c[i].detach().clone() for c in batch.controls], hidden.detach().clone()))
        return inner(transformer, batch, noisy, model)


def kept_subset(entry: EncodedSample, controls: list[torch.Tensor]) -> str:
    """Which of the entry's controls a forward's row carries (as a subset key)."""
    kept, start = [], 0
    for control in controls:
        match = [j for j in range(start, len(entry.controls)) if torch.equal(entry.controls[j], control)]
        assert match, "a control that is none of the sample's"
        kept.append(match[0])
        start = match[0] + 1
    return ",".join(str(j) for j in kept)


def test_training_takes_the_prompt_of_the_kept_references_and_resumes_from_the_cache(tmp_path, registry):
    folder = make_folder(tmp_path / "data", {f"s{i}": [0, 1] for i in range(4)})
    config = qwen_config(tmp_path, folder, data={"reference_dropout": 0.5, "caption_dropout": 0.3},
                         train={"max_steps": 6, "save_every": 3, "batch_size": 2})
    spy = PromptSpy()
    full = train(config, registry=spied_registry(spy, trainer=PLUS))
    assert len(full.losses) == 6 and all(np.isfinite(full.losses))
    assert spy.encoded == 4 * 4  # each sample and its 3 proper subsets ("", "0", "1"), once

    cache, context = open_cache(config, registry, Console(stderr=True))
    entries = {r.key: cache.get(entry_key(context, r.fingerprint())) for r in open_records(config.data)}
    assert all(e is not None and e.subset_prompts is not None and e.subset_empty_prompts is not None
               for e in entries.values())
    seen: dict[str, int] = {}
    for key, controls, hidden in spy.rows:
        entry = entries[key]
        subset = kept_subset(entry, controls)
        seen[subset] = seen.get(subset, 0) + 1
        if subset == "0,1":
            options = [entry.prompt, entry.empty_prompt]
        else:
            options = [entry.subset_prompts[subset], entry.subset_empty_prompts[subset]]
            assert not any(torch.equal(hidden, p.hidden) for p in (entry.prompt, entry.empty_prompt))
        assert any(torch.equal(hidden, p.hidden) for p in options), (key, subset)
    assert seen.get("", 0) > 0 and seen.get("0", 0) + seen.get("1", 0) > 0 and seen.get("0,1", 0) > 0, seen

    # killed after step 3: the resume reads every sample from the cache and trains the same steps
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-000006")
    (run / "pytorch_lora_weights.safetensors").unlink()
    again = PromptSpy()
    resumed = train(config, registry=spied_registry(again, trainer=PLUS), resume=True)
    assert again.encoded == 0
    assert resumed.losses == full.losses[3:]


# --------------------------------------------------------------------------- cache key


def test_the_cache_key_follows_whether_subset_prompts_are_encoded(tmp_path, registry):
    folder = make_folder(tmp_path / "data", {f"s{i}": [0, 1] for i in range(2)})

    def build(p: float):
        config = qwen_config(tmp_path, folder, data={"reference_dropout": p})
        return build_cache(config, registry), config

    first, _ = build(0.0)
    assert first.encoded == 2
    switched_on, config = build(0.3)
    assert switched_on.encoded == 2  # new key: entries with subset prompts
    changed, _ = build(0.5)
    assert changed.encoded == 0  # same key: the entries hold the same encodings
    assert build(0.0)[0].encoded == 0  # the entries without subset prompts are still there

    cache, context = open_cache(config, registry, Console(stderr=True))
    for record in open_records(config.data):
        entry = cache.get(entry_key(context, record.fingerprint()))
        assert entry is not None and entry.subset_prompts is not None and sorted(entry.subset_prompts) == ["", "0", "1"]
